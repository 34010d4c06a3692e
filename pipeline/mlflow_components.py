"""The MLflow pyfunc face of the VQ and the text encoder, logged as "models from code" (nothing pickled).

VQ: `predict(pd.DataFrame({"image": [base64 PNG, ...]}))` returns base64 PNG reconstructions
(encode, quantize, decode) at the input size. Text encoder: `predict(pd.DataFrame({"caption": [...]}))`
returns the pooled text embeddings as lists of floats. See pipeline/components.py.
"""

import base64
import io

import mlflow
from mlflow.pyfunc import PythonModel


class ComponentPyfunc(PythonModel):
    def load_context(self, context):
        from pipeline.models.text import TextEncoder
        from pipeline.models.vq import VQModel

        if "vq" in context.artifacts:
            self.kind, self.model = "vq", VQModel.load(context.artifacts["vq"])[0]
        else:
            self.kind, self.model = "clip", TextEncoder.load(context.artifacts["clip"])

    def predict(self, context, model_input, params=None):
        import numpy as np
        import torch
        from PIL import Image

        from pipeline.data.images import images_to_tensor, tensor_to_images
        from pipeline.model_package import png_bytes

        if self.kind == "clip":
            return self.model.encode(list(model_input["caption"])).pooled.tolist()
        arrays = [np.asarray(Image.open(io.BytesIO(base64.b64decode(b))).convert("RGB")) for b in model_input["image"]]
        with torch.no_grad():
            recon = self.model.decode(self.model.encode(images_to_tensor(np.stack(arrays))))
        return [base64.b64encode(png_bytes(image)).decode() for image in tensor_to_images(recon)]


mlflow.models.set_model(ComponentPyfunc())
