"""The Serve app on an untrained tiny package: validation, determinism under batching, metrics, load.

One app (real Ray Serve, under the session's local Ray) for the whole module; the package is freshly
initialised (no training), which is enough for everything but the pictures' content.
"""

import asyncio
import json
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import pytest

from pipeline.benchmarks.serve import (
    PNG_MAGIC,
    get_json,
    is_png,
    malformed_requests,
    post,
    run_load,
    start_app,
    write_untrained_package,
)
from pipeline.sample_client import free_port
from pipeline.serve import MAX_PROMPT_CHARS, RequestError, validate

STEPS = 4


@pytest.fixture(scope="module")
def package(tmp_path_factory):
    return write_untrained_package(tmp_path_factory.mktemp("serve") / "model", steps=STEPS)


@pytest.fixture(scope="module")
def served(ray_session, package):
    from ray import serve

    model = package
    # max_batch_size 8: concurrent requests share batches; the fixed forward shape keeps the tests quick.
    base_url = start_app(str(model), free_port(), num_cpus=1, max_batch_size=8, batch_wait_timeout_s=0.1,
                         name="ldm-test")
    yield base_url, str(model)
    serve.shutdown()


def _generate(base_url: str, **body):
    return post(base_url, json.dumps(body).encode(), timeout=120)


def test_validate_unit():
    defaults = {"guidance_scale": 3.0, "steps": 10, "sampler": "ddim"}
    params = validate({"prompt": "x"}, defaults)
    assert (params.steps, params.guidance_scale, params.sampler, params.seed, params.num_images) == (10, 3.0, "ddim", 0, 1)
    assert validate({"prompt": "x", "guidance_scale": 0, "steps": 1000, "num_images": 16}, defaults).steps == 1000
    assert validate({"prompt": "x" * MAX_PROMPT_CHARS}, defaults).prompt
    with pytest.raises(RequestError) as err:
        validate({"prompt": "x", "steps": 500}, defaults, max_steps=100)
    assert err.value.field == "steps"


def test_fixed_batch_makes_latents_batch_invariant(package):
    import torch

    from pipeline.model_package import GenerationRequest, PipelineModel

    model = PipelineModel(package)
    model.fixed_batch = 4  # 8 rows per forward: the batch of 6 below takes two chunks
    latents = []
    decode = model.vq.decode
    model.vq.decode = lambda z: latents.append(z.clone()) or decode(z)
    target = GenerationRequest("a red circle on the left", seed=5, guidance_scale=4.0)
    others = [GenerationRequest(f"prompt {i}" + " red blue" * 10 * (i % 2), seed=i, guidance_scale=2.0 + i)
              for i in range(5)]  # short and truncated prompts: the text path must not depend on them
    for sampler in ("ddim", "ddpm"):
        latents.clear()
        alone = model.generate([target], STEPS, sampler)[0]
        batched = model.generate(others + [target], STEPS, sampler)[5]
        assert torch.equal(latents[0][0], torch.cat(latents[1:])[5]), sampler
        assert (alone == batched).all()


def test_bad_fields_get_4xx_naming_the_field(served):
    base_url, model = served
    for body, field in malformed_requests(MAX_PROMPT_CHARS):
        status, headers, data = post(base_url, body, timeout=60)
        assert 400 <= status < 500, (body[:60], status, data[:200])
        answer = json.loads(data)
        assert answer["field"] == field, (body[:60], answer)
        assert headers.get("X-Model-Version") == model
    status, headers, data = _generate(base_url, prompt="a red circle on the left", steps=STEPS)
    assert status == 200 and data.startswith(PNG_MAGIC)  # still up


def test_png_answers_carry_version_and_truncation(served):
    base_url, model = served
    status, headers, data = _generate(base_url, prompt="a blue square", steps=1, sampler="dpmpp_2m")
    assert status == 200 and headers.get("Content-Type") == "image/png" and is_png(data)
    assert headers.get("X-Model-Version") == model and headers.get("X-Prompt-Truncated") is None
    status, headers, data = _generate(base_url, prompt="red " * 50, steps=1, num_images=2, guidance_scale=1.0)
    assert status == 200 and headers.get("X-Prompt-Truncated")
    answer = json.loads(data)
    assert answer["seeds"] == [0, 1] and answer["model_version"] == model and len(answer["images"]) == 2
    status, health = get_json(base_url, "/health")
    assert status == 200 and health["status"] == "ok" and health["model_version"] == model


def test_same_request_same_png_alone_or_batched(served):
    base_url, _ = served
    target = {"prompt": "a green triangle at the top", "seed": 1234, "guidance_scale": 4.5, "steps": STEPS,
              "sampler": "ddim"}
    status, _, alone = _generate(base_url, **target)
    assert status == 200 and is_png(alone)
    others = [{"prompt": f"a yellow circle {i}", "seed": i, "guidance_scale": 1.0 + i, "steps": STEPS,
               "sampler": "ddim"} for i in range(7)]
    others[3]["steps"] = STEPS + 1  # another group in the same batch
    others[5]["guidance_scale"] = 1.0  # the conditional-only group
    bodies = others[:4] + [target] + others[4:]
    with ThreadPoolExecutor(max_workers=len(bodies)) as pool:
        answers = list(pool.map(lambda b: _generate(base_url, **b), bodies))
    assert all(status == 200 for status, _, _ in answers)
    assert answers[4][2] == alone
    assert len({data for _, _, data in answers}) == len(bodies)  # the others differ
    _, metrics = get_json(base_url, "/metrics")
    assert max(int(k) for k in metrics["sampler"]["batch_size_histogram"]) > 1  # it was batched


def test_metrics_move(served):
    base_url, model = served
    _, before = get_json(base_url, "/metrics")
    assert before["model_version"] == model
    _generate(base_url, prompt="a red square at the top", steps=STEPS, num_images=3)
    _generate(base_url, prompt="x", steps=0)
    post(base_url, b"nope", timeout=30)
    _, after = get_json(base_url, "/metrics")
    assert after["requests"]["ok"] == before["requests"]["ok"] + 1
    assert after["requests"]["bad"] == before["requests"]["bad"] + 2
    assert after["requests"]["error"] == before["requests"]["error"]
    assert after["images_generated"] == before["images_generated"] + 3
    assert after["sampler"]["images"] >= before["sampler"]["images"] + 3
    assert after["latency_s"]["count"] == before["latency_s"]["count"] + 1 and after["latency_s"]["p95"] > 0
    assert after["sampler"]["mean_batch_size"] >= 1
    with urllib.request.urlopen(f"{base_url}/metrics?format=prometheus", timeout=30) as resp:
        text = resp.read().decode()
    assert 'ldm_requests_total{outcome="ok"}' in text and "ldm_mean_batch_size" in text


def test_batches_hold_what_queued_while_the_sampler_ran(served):
    """8 clients, each sending its next request a random moment after its answer came: the next
    batch must hold what arrived while the sampler ran (plain @serve.batch made a batch of each wait
    window's arrivals behind the busy sampler: mean 1.55 requests at concurrency 16)."""
    import random
    import time

    base_url, _ = served
    _, before = get_json(base_url, "/metrics")

    def client(i):
        pause = random.Random(i)
        statuses = []
        for j in range(4):
            time.sleep(pause.uniform(0.0, 0.4))
            statuses.append(_generate(base_url, prompt=f"a blue square {i} {j}", seed=j, steps=5 * STEPS)[0])
        return statuses

    with ThreadPoolExecutor(max_workers=8) as pool:
        statuses = [s for answers in pool.map(client, range(8)) for s in answers]
    assert statuses == [200] * 32
    _, after = get_json(base_url, "/metrics")
    batches = after["sampler"]["batches"] - before["sampler"]["batches"]
    images = after["sampler"]["images"] - before["sampler"]["images"]
    assert images == 32 and images / batches >= 4, (images, batches)


def test_short_load_run(served):
    base_url, _ = served
    result = run_load(base_url, requests=24, concurrency=8, steps=STEPS, serial=2, time_budget_s=90)
    assert result["skipped"] == 0 and result["no_answer"] == 0
    assert result["errors_5xx"] == 0 and result["wrong"] == 0
    assert result["ok"] == result["good_sent"] == 18
    assert result["bad_4xx"] == result["bad_field_named"] == result["bad_sent"] == 6
    assert result["healthy_after"] and result["versioned"] == 24
