"""The MLflow pyfunc face of the pipeline model, logged as "models from code" (nothing pickled).

`mlflow.pyfunc.load_model(uri).predict(pd.DataFrame({"prompt": [...]}))` returns base64 PNGs; params
guidance_scale, steps, sampler and width + height (one of the model's sizes).
Serving and jobs/sample.py do not go through pyfunc: they download the model's `pipeline` artefact
and load it directly (pipeline.model_package).
"""

import base64

import mlflow
from mlflow.pyfunc import PythonModel


class LatentDiffusionPyfunc(PythonModel):
    def load_context(self, context):
        from pipeline.model_package import MLFLOW_ARTIFACT, PipelineModel

        self.model = PipelineModel.load(context.artifacts[MLFLOW_ARTIFACT])

    def predict(self, context, model_input, params=None):
        from pipeline.model_package import GenerationRequest, png_bytes

        params = {**self.model.defaults, **(params or {})}
        prompts = list(model_input["prompt"])
        seeds = list(model_input["seed"]) if "seed" in model_input else list(range(len(prompts)))
        size = (int(params["width"]), int(params["height"])) if "width" in params else None
        requests = [GenerationRequest(p, int(s), float(params["guidance_scale"]), size) for p, s in zip(prompts, seeds)]
        images = self.model.generate(requests, int(params["steps"]), str(params["sampler"]))
        return [base64.b64encode(png_bytes(img)).decode() for img in images]


mlflow.models.set_model(LatentDiffusionPyfunc())
