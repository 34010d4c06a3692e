"""The Serve app on an untrained tiny package: validation, determinism under batching, metrics, load.

One app (real Ray Serve, under the session's local Ray) for the whole module; the package is freshly
initialised (no training), which is enough for everything but the pictures' content.
"""

import json
import time
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

pytestmark = pytest.mark.slow  # whole stages, servers or clusters: `make test-fast` leaves them out

STEPS = 4


@pytest.fixture(scope="module")
def package(tmp_path_factory):
    # Aspect-ratio buckets: square by default, and 2:1 and 1:2 on request.
    return write_untrained_package(tmp_path_factory.mktemp("serve") / "model", steps=STEPS,
                                   sizes=["32x32", "48x24", "24x48"])


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


def test_a_size_is_one_of_the_models_or_a_4xx_that_lists_them(served):
    import io

    from PIL import Image

    base_url, _ = served
    _, health = get_json(base_url, "/health")
    assert health["sizes"] == ["32x32", "48x24", "24x48"] and health["default_size"] == "32x32"
    for body, size in (({}, (32, 32)), ({"width": 48, "height": 24}, (48, 24)), ({"width": 24, "height": 48}, (24, 48))):
        status, _, data = _generate(base_url, prompt="a red circle on the left", steps=STEPS, **body)
        assert status == 200 and Image.open(io.BytesIO(data)).size == size
    status, _, data = _generate(base_url, prompt="x", steps=STEPS, width=40, height=40)
    answer = json.loads(data)
    assert status == 422 and answer["field"] == "width"
    assert "40x40" in answer["error"] and all(size in answer["error"] for size in ("32x32", "48x24", "24x48"))
    status, _, data = _generate(base_url, prompt="x", steps=STEPS, width=48)
    assert status == 400 and json.loads(data)["field"] == "height"


def test_app_arguments_are_typed_and_a_misspelt_one_is_named():
    from pydantic import ValidationError

    from pipeline.config import ServeConfig
    from pipeline.serve import AppArgs

    args = AppArgs.model_validate({"model_uri": "models:/m/1", "num_cpus": "4"})  # as a Serve config gives them
    assert args.num_cpus == 4.0 and args.max_batch_size == ServeConfig.max_batch_size
    for bad, name in (({"model_uri": "m", "max_batch": 8}, "max_batch"), ({"max_batch_size": 8}, "model_uri"),
                      ({"model_uri": "m", "max_batch_size": 0}, "max_batch_size")):
        with pytest.raises(ValidationError, match=name):
            AppArgs.model_validate(bad)


def test_fixed_batch_makes_latents_batch_invariant(package):
    import torch

    from pipeline.model_package import GenerationRequest, PipelineModel

    model = PipelineModel.load(package)
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


def _sampler_stats(base_url: str) -> dict:
    return get_json(base_url, "/metrics")[1]["sampler"]


def _wait_for(condition, what: str, timeout_s: float = 600) -> None:
    """Poll `condition` until true; a wait that cannot end fails naming what it waited for."""
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"waited {timeout_s:.0f} s for {what}")
        time.sleep(0.02)


def _hold_sampler(base_url: str, pool: ThreadPoolExecutor, steps: int):
    """Send one request of `steps` sampling steps and return its future once the sampler runs it:
    whatever is sent next queues behind a busy sampler, however fast the machine."""
    future = pool.submit(_generate, base_url, prompt="hold the sampler", seed=99, steps=steps)
    _wait_for(lambda: _sampler_stats(base_url)["running"] == 1, "the holding request to start sampling")
    return future


def _new_batches(before: dict, after: dict) -> dict[int, int]:
    """Batch sizes (size -> count) the sampler formed between two /metrics readings."""
    old, new = before["batch_size_histogram"], after["batch_size_histogram"]
    return {int(k): n - old.get(k, 0) for k, n in new.items() if n - old.get(k, 0)}


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
    before = _sampler_stats(base_url)
    with ThreadPoolExecutor(max_workers=len(bodies) + 1) as pool:
        hold = _hold_sampler(base_url, pool, steps=1000)  # the 8 queue behind it and form one batch
        futures = [pool.submit(_generate, base_url, **body) for body in bodies]
        answers = [future.result() for future in futures]
        assert hold.result()[0] == 200
    assert all(status == 200 for status, _, _ in answers)
    assert answers[4][2] == alone
    assert len({data for _, _, data in answers}) == len(bodies)  # the others differ
    assert max(_new_batches(before, _sampler_stats(base_url))) > 1  # it was batched


def test_requests_that_queue_behind_a_running_batch_form_the_next_batch(served):
    """While a long request runs, 6 more arrive one at a time, each more than the batch wait window
    (0.1 s) after the last. All 6 must form the next batch. Plain @serve.batch forms a batch from each
    wait window's arrivals even while the sampler is busy: 6 batches of one here (and a mean of 1.55
    requests per batch at concurrency 16). The long request is made longer until it outlasts the
    arrivals, so the test does not depend on the machine's speed."""
    base_url, _ = served
    staggered = 6  # under max_batch_size (8): the next batch has room for all of them
    for hold_steps in (300, 1000):
        before = _sampler_stats(base_url)
        with ThreadPoolExecutor(max_workers=staggered + 1) as pool:
            hold = _hold_sampler(base_url, pool, hold_steps)
            queued = []
            for i in range(staggered):
                queued.append(pool.submit(_generate, base_url, prompt=f"a blue square {i}", seed=i, steps=STEPS))
                _wait_for(lambda: _sampler_stats(base_url)["received"] >= before["received"] + i + 2,
                          f"request {i + 1} to reach the sampler")
                time.sleep(0.15)
            held_throughout = _sampler_stats(base_url)["batches"] == before["batches"]
            statuses = [hold.result()[0]] + [future.result()[0] for future in queued]
        assert statuses == [200] * (staggered + 1)
        if held_throughout:
            break
    else:
        pytest.fail(f"a {hold_steps}-step request finished before {staggered} short ones arrived")
    after = _sampler_stats(base_url)
    assert _new_batches(before, after) == {1: 1, staggered: 1}
    assert after["queued"] == after["running"] == 0


def test_short_load_run(served):
    base_url, _ = served
    # No time budget that a slow machine could miss: every request is sent and answered.
    result = run_load(base_url, requests=24, concurrency=8, steps=STEPS, serial=2, time_budget_s=1800)
    assert result["skipped"] == 0 and result["no_answer"] == 0
    assert result["errors_5xx"] == 0 and result["wrong"] == 0
    assert result["ok"] == result["good_sent"] == 18
    assert result["bad_4xx"] == result["bad_field_named"] == result["bad_sent"] == 6
    assert result["healthy_after"] and result["versioned"] == 24
