"""The model-based rewards (aesthetic, clipscore, pickscore, alignment) on tiny random models saved to disk and
loaded through the real `from_pretrained` path; the weighted multi-reward; the reward server and `remote`."""

import base64
import http.client
import json
import math
import os
import socket
import subprocess
import sys
import textwrap
import threading
import time
import urllib.error
import urllib.request

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

import ddpo
from ddpo.cli import main
from ddpo.cli.reward_server import RewardServer
from ddpo.cli.serve import is_loopback
from ddpo.core.configuration.config import resolve_config
from ddpo.core.configuration.errors import UsageError
from ddpo.core.engine.multireward import MultiReward
from ddpo.core.engine.rollout import score
from ddpo.plugins.rewards.aesthetic import MLP_SHAPES, Aesthetic, fetch_weights
from ddpo.plugins.rewards.alignment import Alignment, bertscore_recall
from ddpo.plugins.rewards.clip import ClipScore, PickScore
from ddpo.plugins.rewards.clip_preprocessing import ClipImagePreprocessor
from ddpo.plugins.rewards.digit import Digit
from ddpo.plugins.rewards.jpeg import Compressibility
from ddpo.plugins.rewards.remote import TOKEN_ENV, Remote, RemoteRewardError, encode_images
from ddpo.testing import build_tiny_llava, build_tiny_text_encoder, check_reward

CPU = torch.device("cpu")
PROMPTS = ["a cat", "a dog riding a bike", "a horse"]


@pytest.fixture(scope="session")
def tiny_llava(tmp_path_factory):
    return build_tiny_llava(tmp_path_factory.mktemp("tiny-llava"))


@pytest.fixture(scope="session")
def tiny_encoder(tmp_path_factory):
    return build_tiny_text_encoder(tmp_path_factory.mktemp("tiny-bert"))


def random_images(batch=3, height=32, width=32, seed=0):
    return torch.rand(batch, 3, height, width, generator=torch.Generator().manual_seed(seed))


# --- CLIP preprocessing ------------------------------------------------------------------------------------------

def test_tensor_preprocessing_matches_clip_image_processor(tiny_clip):
    """Resize-shortest-side, centre crop and normalisation on tensors agree with transformers' processor on
    the same 8-bit images up to bicubic implementation differences (< 0.02 in normalised units, ~1/255 of a
    pixel value), and exactly when no resize is needed."""
    from transformers import AutoImageProcessor

    processor = AutoImageProcessor.from_pretrained(tiny_clip)
    preprocess = ClipImagePreprocessor(processor)
    for height, width in [(40, 56), (96, 64), (32, 32)]:
        smooth = torch.nn.functional.interpolate(random_images(2, 8, 8), size=(height, width), mode="bilinear")
        pixels = (smooth * 255).round().byte()
        expected = processor(images=[image.permute(1, 2, 0).numpy() for image in pixels],
                             return_tensors="pt")["pixel_values"]
        ours = preprocess(pixels.float() / 255)
        assert ours.shape == expected.shape == (2, 3, 32, 32)
        tolerance = 0 if (height, width) == (32, 32) else 0.02
        assert (ours - expected).abs().max() <= tolerance + 1e-6, (height, width)


# --- aesthetic ---------------------------------------------------------------------------------------------------

def test_aesthetic_is_the_public_mlp_on_normalised_clip_embeddings(tiny_clip, aesthetic_weights):
    """The reward equals a float64 hand computation: the full CLIPModel's projected image embedding of the same
    pixels, L2-normalised, through W7(W6(W4(W2(W0 e + b0) + b2) + b4) + b6) + b7."""
    from transformers import CLIPModel

    rewards = check_reward(Aesthetic, {"clip_model": str(tiny_clip), "weights": str(aesthetic_weights)})
    reward = Aesthetic({"clip_model": str(tiny_clip), "weights": str(aesthetic_weights)})
    reward.load(CPU)
    images = random_images()  # what check_reward scores
    clip = CLIPModel.from_pretrained(tiny_clip).double()
    with torch.no_grad():
        pixels = reward.preprocess(images).double()
        embedding = clip.visual_projection(clip.vision_model(pixel_values=pixels).pooler_output)
    hidden = embedding / embedding.norm(dim=-1, keepdim=True)
    state = {key: value.double() for key, value in torch.load(aesthetic_weights, weights_only=True).items()}
    for layer in (0, 2, 4, 6, 7):
        hidden = hidden @ state[f"layers.{layer}.weight"].T + state[f"layers.{layer}.bias"]
    torch.testing.assert_close(rewards.double(), hidden.squeeze(1), rtol=1e-4, atol=1e-5)
    assert rewards.std() > 0
    embeddings = reward.image_embeddings(images)
    assert embeddings.shape == (3, 768) and not embeddings.requires_grad
    torch.testing.assert_close(embeddings.norm(dim=-1), torch.ones(3))


def test_aesthetic_weights_as_safetensors_or_url_downloaded_once(tiny_clip, aesthetic_weights, tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    state = torch.load(aesthetic_weights, weights_only=True)
    source = tmp_path / "mlp.safetensors"
    save_file(state, str(source))
    url = source.as_uri()
    cached = fetch_weights(url)
    assert cached.parent == tmp_path / "cache" / "ddpo" / "rewards" and cached.read_bytes() == source.read_bytes()
    source.unlink()  # the second use reads the cache, not the URL
    assert fetch_weights(url) == cached
    images = random_images()
    scores = {}
    for weights in (url, str(aesthetic_weights)):
        reward = Aesthetic({"clip_model": str(tiny_clip), "weights": weights})
        reward.load(CPU)
        scores[weights] = reward(images, PROMPTS, [{}] * 3)
    torch.testing.assert_close(scores[url], scores[str(aesthetic_weights)])
    with pytest.raises(UsageError, match="cannot download reward weights from file:"):
        fetch_weights((tmp_path / "missing.pth").as_uri())


class PickledObject:
    """Stands for arbitrary pickled code in a .pth file."""


def test_aesthetic_refuses_missing_or_mismatched_weights(tiny_clip, tmp_path):
    with pytest.raises(UsageError, match="reward weights file not found"):
        Aesthetic({"clip_model": str(tiny_clip), "weights": str(tmp_path / "none.pth")}).load(CPU)
    wrong = {key.replace("layers.", "net."): torch.zeros(shape) for key, shape in MLP_SHAPES.items()}
    torch.save(wrong, tmp_path / "wrong.pth")
    with pytest.raises(UsageError) as error:
        Aesthetic({"clip_model": str(tiny_clip), "weights": str(tmp_path / "wrong.pth")}).load(CPU)
    message = str(error.value)
    assert "\n" not in message and "layers.0.weight (1024, 768)" in message and "layers.7.bias (1,)" in message
    torch.save({"layers.0.weight": PickledObject()}, tmp_path / "pickled.pth")  # code, not tensors
    with pytest.raises(UsageError, match="cannot load .*pickled.pth as a weights-only torch file"):
        Aesthetic({"clip_model": str(tiny_clip), "weights": str(tmp_path / "pickled.pth")}).load(CPU)


# --- clipscore / pickscore ---------------------------------------------------------------------------------------

def test_clipscore_and_pickscore_are_scaled_clip_cosines(tiny_clip):
    """Against CLIPModel's own forward pass: logits_per_image = exp(logit_scale) x cos, so PickScore is its
    diagonal and CLIPScore 100 x the diagonal / exp(logit_scale)."""
    from transformers import AutoTokenizer, CLIPModel

    clipscore = check_reward(ClipScore, {"clip_model": str(tiny_clip)})
    pickscore = check_reward(PickScore, {"model": str(tiny_clip), "processor": str(tiny_clip)})
    model = CLIPModel.from_pretrained(tiny_clip).double()
    tokens = AutoTokenizer.from_pretrained(tiny_clip)(["a cat"] * 3, padding=True, return_tensors="pt")
    pixels = ClipImagePreprocessor.from_pretrained(str(tiny_clip))(random_images()).double()
    with torch.no_grad():
        logits = model(input_ids=tokens["input_ids"], attention_mask=tokens["attention_mask"],
                       pixel_values=pixels).logits_per_image.diagonal()
    torch.testing.assert_close(pickscore.double(), logits, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(clipscore.double(), 100 * logits / model.logit_scale.exp(), rtol=1e-4, atol=1e-4)


def test_clipscore_depends_on_the_prompt(tiny_clip):
    reward = ClipScore({"clip_model": str(tiny_clip)})
    reward.load(CPU)
    images = random_images(1).repeat(3, 1, 1, 1)
    scores = reward(images, PROMPTS, [{}] * 3)
    assert len(set(scores.tolist())) == 3


# --- alignment ---------------------------------------------------------------------------------------------------

def test_bertscore_recall_matches_a_float64_loop():
    generator = torch.Generator().manual_seed(0)
    reference, answer = torch.randn(2, 4, 5, generator=generator), torch.randn(2, 6, 5, generator=generator)
    weights = torch.tensor([[0, 1, 1, 0], [0, 1, 1, 1]], dtype=torch.float32)  # special/padding tokens: 0
    answer_mask = torch.tensor([[1, 1, 1, 1, 0, 0], [1, 1, 1, 1, 1, 1]], dtype=torch.bool)
    recall = bertscore_recall(reference, weights, answer, answer_mask)
    for row in range(2):
        matched = []
        for i in range(4):
            if weights[row, i]:
                r = reference[row, i].double() / reference[row, i].double().norm()
                matched.append(max(float(r @ (answer[row, j].double() / answer[row, j].double().norm()))
                                   for j in range(6) if answer_mask[row, j]))
        assert recall[row].item() == pytest.approx(sum(matched) / len(matched), abs=1e-6)


def test_alignment_scores_the_vlm_answer_against_the_prompt(tiny_llava, tiny_encoder):
    options = {"vlm": str(tiny_llava), "scorer": str(tiny_encoder), "scorer_layer": 2, "max_new_tokens": 6}
    rewards = check_reward(Alignment, options)
    reward = Alignment(options)
    reward.load(CPU)
    with torch.no_grad():
        answers = reward.describe(random_images())
        assert len(answers) == 3 and all(isinstance(answer, str) for answer in answers)
        torch.testing.assert_close(rewards, reward.recall(answers, ["The image contains a cat"] * 3))
        same = reward.recall(["The image contains a cat"], ["The image contains a cat"])
    assert same.item() == pytest.approx(1.0, abs=1e-5)
    assert ((rewards > -1) & (rewards < 1)).all()
    assert reward.vlm_prompt() == "USER: <image>\nwhat is going on in this image? ASSISTANT:"  # chat template
    reward.processor.chat_template = None
    assert reward.vlm_prompt() == "USER: <image>\nwhat is going on in this image? ASSISTANT:"  # LLaVA-1.5 format


def test_alignment_options_are_checked(tiny_llava, tiny_encoder):
    with pytest.raises(UsageError, match="no BERTScore layer known"):
        Alignment({"vlm": str(tiny_llava), "scorer": str(tiny_encoder)}).load(CPU)
    with pytest.raises(ValueError, match="must contain {prompt}"):
        Alignment({"reference": "no slot"})


# --- check_reward extensions -------------------------------------------------------------------------------------

class Noisy(ddpo.Reward):
    name = "noisy"

    def __call__(self, images, prompts, metadata):
        return torch.rand(len(prompts))


def test_check_reward_catches_nondeterminism_loose_options_and_torch_at_import(tmp_path, monkeypatch):
    with pytest.raises(AssertionError, match="not deterministic"):
        check_reward(Noisy, check_import=False)

    class Loose(ddpo.Reward):
        name = "loose"

        class Options(ddpo.Options):
            model_config = {"extra": "allow"}

        def __call__(self, images, prompts, metadata):
            return images.mean(dim=(1, 2, 3))

    with pytest.raises(AssertionError, match="accepts unknown keys"):
        check_reward(Loose, check_import=False)
    (tmp_path / "heavy_reward.py").write_text(textwrap.dedent("""
        import torch
        import ddpo

        class Heavy(ddpo.Reward):
            name = "heavy"

            def __call__(self, images, prompts, metadata):
                return images.mean(dim=(1, 2, 3))
    """))
    monkeypatch.syspath_prepend(str(tmp_path))
    from heavy_reward import Heavy

    with pytest.raises(AssertionError, match="importing heavy_reward imports torch"):
        check_reward(Heavy)


def test_reward_modules_import_no_torch():
    probe = textwrap.dedent("""
        import sys
        for name in ("aesthetic", "clip", "alignment", "multi", "remote"):
            __import__(f"ddpo.plugins.rewards.{name}")
        import ddpo.cli.serve
        print("HEAVY", sorted(m for m in ("torch", "transformers", "numpy", "PIL", "fastapi", "starlette", "uvicorn")
                              if m in sys.modules))
    """)
    result = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert "HEAVY []" in result.stdout


# --- weighted multi-reward ---------------------------------------------------------------------------------------

def test_reward_sum_resolves_to_multi_with_validated_components():
    config = resolve_config(sets=["reward.components.incompressibility.weight=0.5",
                                  "reward.components.incompressibility.quality=80"],
                            flags={"reward": {"name": "compressibility+incompressibility"}})
    assert config.reward.name == "multi"
    assert config.reward.options()["components"] == {
        "compressibility": {"reward": "compressibility", "weight": 1.0, "quality": 95},
        "incompressibility": {"reward": "incompressibility", "weight": 0.5, "quality": 80}}
    with pytest.raises(UsageError, match=r"invalid value for 'reward.components.digit.target'.*options of reward"):
        resolve_config(sets=["reward.components.digit.target=12"], flags={"reward": {"name": "digit+legibility"}})
    with pytest.raises(UsageError, match="unknown reward 'aesthtic'"):
        resolve_config(flags={"reward": {"name": "aesthtic+digit"}})
    with pytest.raises(UsageError, match="not one of the summed rewards"):
        resolve_config(sets=["reward.components.jpeg.weight=2"], flags={"reward": {"name": "digit+legibility"}})


def test_multi_combine_z_scores_each_component_then_weights():
    reward = MultiReward({"components": {"digit": {"weight": 2.0}, "d3": {"reward": "digit", "target": 3,
                                                                           "weight": -0.5}}})
    first, second = torch.tensor([0.1, 0.5, 0.9, 0.3]), torch.tensor([4.0, 4.0, 4.0, 4.0])
    combined = reward.combine({"digit": first, "d3": second})
    values = first.double().numpy()
    expected = 2.0 * (values - values.mean()) / values.std()  # the constant component contributes 0
    np.testing.assert_allclose(combined.numpy(), expected, rtol=1e-6)
    raw = reward.combine({"digit": first, "d3": second}, normalize=False)
    np.testing.assert_allclose(raw.numpy(), 2.0 * values - 0.5 * 4.0, rtol=1e-6)
    direct = check_reward(MultiReward, {"components": {"digit": {}, "legibility": {"weight": 3}}})
    reward = MultiReward({"components": {"digit": {}, "legibility": {"weight": 3}}})
    reward.load(CPU)
    parts = reward.score_components(random_images(), ["a cat"] * 3, [{}] * 3)
    torch.testing.assert_close(direct, parts["digit"] + 3 * parts["legibility"])


# --- reward server and remote ------------------------------------------------------------------------------------

TOKEN = "test-token-0123456789"


@pytest.fixture()
def serve():
    """Starts reward servers in this process on free loopback ports (stopped after the test)."""
    servers = []

    def start(reward=None, **settings):
        server = RewardServer(reward or Compressibility(), port=0, **settings)
        server.start()
        servers.append(server)
        return server

    yield start
    for server in servers:
        server.close()


def test_two_clients_are_batched_and_get_their_own_rewards(serve):
    """Two clients send 3 and 5 images at once; the server (which waits up to 10 s for a batch of 8) scores
    them in one call and answers each with its own rows."""
    jpeg_server = serve(max_batch=8, batch_window=10.0)
    direct = Compressibility()
    batches = {"png": random_images(3, seed=1), "raw": random_images(5, seed=2)}
    answers, barrier = {}, threading.Barrier(2)

    def client(image_format):
        remote = Remote({"url": jpeg_server.url, "image_format": image_format, "timeout": 30})
        remote.load(CPU)
        barrier.wait(timeout=30)
        images = batches[image_format]
        answers[image_format] = remote(images, ["a cat"] * len(images), [{"i": i} for i in range(len(images))])

    threads = [threading.Thread(target=client, args=(name,)) for name in batches]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    for name, images in batches.items():  # png is lossless at 8 bits; the JPEG reward rounds to 8 bits too
        assert answers[name] == pytest.approx(direct(images, [""] * len(images), [{}] * len(images)), abs=1e-6)
    assert jpeg_server.batch_sizes == [8]  # both requests in one scoring call


def test_remote_reward_errors_name_the_url(serve):
    jpeg_server = serve(batch_window=0.0)
    with socket.socket() as probe:  # a port nobody listens on
        probe.bind(("127.0.0.1", 0))
        dead_port = probe.getsockname()[1]
    dead = Remote({"url": f"http://127.0.0.1:{dead_port}", "retries": 1, "timeout": 5})
    started = time.perf_counter()
    with pytest.raises(RemoteRewardError, match=rf"127.0.0.1:{dead_port}/health did not answer after 2 attempts"):
        dead.load(CPU)
    assert time.perf_counter() - started < 5
    with socket.socket() as silent:  # accepts connections, never answers: the timeout applies
        silent.bind(("127.0.0.1", 0))
        silent.listen()
        slow = Remote({"url": f"http://127.0.0.1:{silent.getsockname()[1]}", "retries": 0, "timeout": 0.5})
        with pytest.raises(RemoteRewardError, match="did not answer after 1 attempts"):
            slow(random_images(1), ["x"], [{}])
    wrong = Remote({"url": jpeg_server.url, "timeout": 10})
    with pytest.raises(RemoteRewardError, match=rf"{jpeg_server.url}/score answered HTTP 400: bad request: 2 images, "
                                                r"1 prompts and 1 metadata"):
        wrong(random_images(2), ["only one prompt"], [{}])


def post_score(url: str, body: bytes, token: str | None = TOKEN) -> tuple[int, str]:
    """POST /score with a raw body: (HTTP status, the answer's "error" or "")."""
    headers = {"Content-Type": "application/json", **({"Authorization": f"Bearer {token}"} if token else {})}
    try:
        with urllib.request.urlopen(urllib.request.Request(f"{url}/score", data=body, headers=headers)) as answer:
            return answer.status, ""
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read())["error"]


def test_server_refuses_missing_tokens_oversized_and_malformed_requests(serve, monkeypatch):
    """A server with a token and a 64 KiB limit: the remote reward's errors are one line naming the URL, and come
    at once (with retries=10 a retried request would take minutes); raw requests get 400s that name the fault."""
    monkeypatch.delenv(TOKEN_ENV, raising=False)
    server = serve(token=TOKEN, max_request_bytes=64 * 1024, batch_window=0.0)
    images = random_images(2)
    for options, fault in [({}, "needs a bearer token: send 'Authorization: Bearer TOKEN'"),
                           ({"token": "not-the-token"}, "wrong bearer token")]:
        client = Remote({"url": server.url, "retries": 10, "timeout": 10, **options})
        for call in (lambda: client.load(CPU), lambda: client(images, ["a"] * 2, [{}] * 2)):
            started = time.perf_counter()
            with pytest.raises(RemoteRewardError) as refused:
                call()
            assert time.perf_counter() - started < 10
            assert f"reward server {server.url}/" in str(refused.value) and "HTTP 401" in str(refused.value)
            assert fault in str(refused.value) and "\n" not in str(refused.value)
    monkeypatch.setenv(TOKEN_ENV, TOKEN)  # the client's other source of the token
    client = Remote({"url": server.url, "retries": 10, "timeout": 10, "image_format": "raw"})
    client.load(CPU)
    assert client(images, ["a"] * 2, [{}] * 2) == pytest.approx(Compressibility()(images, [""] * 2, [{}] * 2))
    big = random_images(8, 64, 64)  # 8 x 48 KiB of float32, more as base64
    with pytest.raises(RemoteRewardError, match=rf"{server.url}/score answered HTTP 413: request body \(\d+ bytes\) "
                                                r"over this server's limit of 65536 bytes \(--max-request-mb 0.0625\)"):
        client(big, ["a"] * 8, [{}] * 8)
    connection = http.client.HTTPConnection("127.0.0.1", int(server.url.rsplit(":", 1)[1]), timeout=10)
    connection.request("POST", "/score", body=iter([b" " * 40_000] * 2), encode_chunked=True,  # no length given
                       headers={"Authorization": f"Bearer {TOKEN}"})
    answer = connection.getresponse()
    assert answer.status == 413 and "over this server's limit" in json.loads(answer.read())["error"]
    connection.close()

    def score_body(images_object, prompts=("a",), **extra) -> bytes:
        return json.dumps({"prompts": list(prompts), "images": images_object, **extra}).encode()

    png = encode_images(random_images(1), "png")
    raw = encode_images(random_images(1), "raw")
    for body, fault in [
            (b"{not json", "the body is not JSON"),
            (b"", "empty body"),
            (b"[1, 2]", "must be a JSON object {prompts, metadata, images}"),
            (score_body(png, prompts=(1,)), "'prompts' must be a list of strings"),
            (score_body(png, metadata="x"), "'metadata' must be a list of objects"),
            (score_body({**png, "data": ["%%%"]}), "images.data[0] is not valid base64"),
            (score_body({**png, "data": [base64.b64encode(b"not an image").decode()]}),
             "images.data[0] is not an image file"),
            (score_body({**raw, "shape": [1, 4, 32, 32]}), "raw images need 'shape' [B, 3, H, W]"),
            (score_body({**raw, "shape": [2, 3, 32, 32]}), "need 24576 bytes of float32, images.data holds 12288"),
            (score_body({"format": "jpeg", "data": []}), "unknown images.format 'jpeg'; use 'png' or 'raw'"),
            (score_body(png, prompts=("a", "b")), "1 images, 2 prompts and 2 metadata")]:
        status, error = post_score(server.url, body)
        assert status == 400 and error.startswith("bad request: ") and fault in error, (fault, status, error)
    assert post_score(server.url, score_body(png))[0] == 200  # the server still serves


def test_serve_reward_command_checks_address_token_and_options(capsys, monkeypatch):
    monkeypatch.delenv(TOKEN_ENV, raising=False)
    for args, fault in [(["--set", "reward.target=12"], "'reward.target'"),
                        (["--host", "0.0.0.0"], f"--host 0.0.0.0 is reachable from other machines: give a token "
                                                f"(set {TOKEN_ENV}, or --token), or serve on 127.0.0.1"),
                        (["--host", "0.0.0.0", "--token", "has a space"], "printable ASCII without spaces")]:
        with pytest.raises(SystemExit) as exit_code:
            main(["serve-reward", "digit", "--port", "0", *args])
        stderr = capsys.readouterr().err
        assert exit_code.value.code == 2 and stderr.count("\n") == 1 and fault in stderr, stderr
    assert not is_loopback("0.0.0.0") and not is_loopback("::")
    assert is_loopback("127.0.0.1") and is_loopback("::1") and is_loopback("localhost")


def test_serve_reward_command_serves_every_interface_with_a_token():
    """`ddpo serve-reward` in its own process on 0.0.0.0 with the token from the environment: the remote reward
    with the token gets the digit reward's scores, one without it a 401."""
    process = subprocess.Popen([sys.executable, "-m", "ddpo", "serve-reward", "digit", "--set", "reward.target=3",
                                "--host", "0.0.0.0", "--port", "0", "--device", "cpu"], stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True, env={**os.environ, TOKEN_ENV: TOKEN})
    try:
        line = process.stdout.readline()  # "serving reward 'digit' on http://0.0.0.0:PORT"
        assert "serving reward 'digit' on http://0.0.0.0:" in line, process.stderr.read() if not line else line
        url = line.split()[-1].replace("0.0.0.0", "127.0.0.1")
        remote = Remote({"url": url, "timeout": 60, "token": TOKEN})
        remote.load(CPU)
        assert remote.served == {"reward": "digit", "options": {"target": 3}}
        direct = Digit({"target": 3})
        direct.load(CPU)
        images = random_images(4, 16, 16)
        expected = direct(images, [""] * 4, [{}] * 4)
        assert remote(images, [""] * 4, [{}] * 4) == pytest.approx(expected.tolist(), abs=0.02)  # 8-bit png
        with pytest.raises(RemoteRewardError, match="HTTP 401"):
            Remote({"url": url, "timeout": 60, "token": "another-token"}).load(CPU)
    finally:
        process.terminate()
        process.wait(timeout=30)


class GatedTaggedMean(ddpo.Reward):
    """Each image's mean pixel plus its metadata's tag: a value only that image of that request has. The first call
    waits for `gate`, so that requests pile up behind it."""

    name = "gated_tagged_mean"

    def __init__(self, options=None):
        super().__init__(options)
        self.gate = threading.Event()
        self.calls = 0

    def __call__(self, images, prompts, metadata):
        self.calls += 1
        if self.calls == 1:
            assert self.gate.wait(60)
        return images.double().mean(dim=(1, 2, 3)) + torch.tensor([float(item["tag"]) for item in metadata],
                                                                    dtype=torch.float64)


HALF_SENT_CLIENT = r"""
import socket, sys, time
port, body_path, part = int(sys.argv[1]), sys.argv[2], sys.argv[3]
body = open(body_path, "rb").read()
sent = body if part == "whole" else body[:len(body) // 2]
connection = socket.create_connection(("127.0.0.1", port))
connection.sendall(f"POST /score HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                   f"Authorization: Bearer {sys.argv[4]}\r\nContent-Length: {len(body)}\r\n\r\n".encode() + sent)
print("sent", flush=True)
time.sleep(600)  # never reads the answer: killed first
"""


def wait_until(condition, what: str, seconds: float = 30) -> None:
    deadline = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.01)


def test_load_several_clients_and_one_killed_mid_request_lose_nothing(serve, tmp_path):
    """Load on loopback: while the first batch is held in the reward, one client process sends a whole request
    and another half of one, and both are SIGKILLed before reading an answer; then 6 clients send 4 requests each
    (1-4 images, png or raw, bounded in size). Every client gets exactly the rewards of its own images (the same
    reward scored locally), the killed whole request is scored once with the others and its answer dropped, the
    half one never reaches the reward, requests are batched, and the server serves on afterwards."""
    reward = GatedTaggedMean()
    server = serve(reward, token=TOKEN, max_batch=8, batch_window=0.05, max_request_bytes=1 << 20)
    port = int(server.url.rsplit(":", 1)[1])
    local = GatedTaggedMean()  # the same reward scored here, through the server's scoring function
    local.gate.set()

    def client_requests(client: int) -> list[tuple]:
        generator = torch.Generator().manual_seed(client)
        return [(torch.rand(int(torch.randint(1, 5, (), generator=generator)), 3, 32, 32, generator=generator),
                 "png" if (client + index) % 2 else "raw", [{"tag": 100 * client + index}]) for index in range(4)]

    answers: dict[tuple[int, int], list[float]] = {}

    def client(number: int, requests: list[tuple]) -> None:
        remotes = {image_format: Remote({"url": server.url, "token": TOKEN, "timeout": 60,
                                         "image_format": image_format}) for image_format in ("png", "raw")}
        for index, (images, image_format, tag) in enumerate(requests):
            answers[number, index] = remotes[image_format](images, ["a prompt"] * len(images), tag * len(images))

    opener = threading.Thread(target=client, args=(-1, [(random_images(2), "raw", [{"tag": -1}])]))
    opener.start()
    wait_until(lambda: reward.calls == 1, "the first batch to reach the reward")
    body = tmp_path / "body.json"
    body.write_text(json.dumps({"prompts": ["killed"] * 3, "metadata": [{"tag": 7}] * 3,
                                "images": encode_images(random_images(3, seed=7), "raw")}))
    killed = [subprocess.Popen([sys.executable, "-c", HALF_SENT_CLIENT, str(port), str(body), part, TOKEN],
                               stdout=subprocess.PIPE, text=True) for part in ("whole", "half")]
    for process in killed:
        assert process.stdout.readline() == "sent\n"
    wait_until(lambda: server.jobs.qsize() == 1, "the whole request to be queued")
    for process in killed:
        process.kill()
        process.wait(timeout=30)
        process.stdout.close()

    clients = {number: client_requests(number) for number in range(6)}
    threads = [threading.Thread(target=client, args=item) for item in clients.items()]
    for thread in threads:
        thread.start()
    wait_until(lambda: server.jobs.qsize() == 1 + len(clients), "every client's first request to be queued")
    reward.gate.set()
    for thread in [opener, *threads]:
        thread.join(timeout=60)
        assert not thread.is_alive()

    for number, requests in clients.items():
        for index, (images, image_format, tag) in enumerate(requests):
            sent = images if image_format == "raw" else (images * 255).round() / 255
            assert answers[number, index] == score(local, sent, [""] * len(images), tag * len(images)).tolist()
    live_images = sum(len(images) for requests in clients.values() for images, _, _ in requests)
    assert sum(server.batch_sizes) == 2 + 3 + live_images  # the opener, the killed whole request, the clients
    assert server.batch_sizes[0] == 2 and max(server.batch_sizes[1:]) > 4  # requests were batched together
    assert server.jobs.qsize() == 0
    after = Remote({"url": server.url, "token": TOKEN, "timeout": 60, "image_format": "raw"})
    after.load(CPU)
    assert after(random_images(1, seed=9), ["x"], [{"tag": 0}]) == score(local, random_images(1, seed=9), ["x"],
                                                                          [{"tag": 0}]).tolist()


# --- every reward in `ddpo run` on a tiny SD pipeline --------------------------------------------------------------

def test_all_rewards_run_on_tiny_sd(tiny_sd, tiny_clip, aesthetic_weights, tiny_llava, tiny_encoder, serve,
                                    forked_cli, tmp_path):
    """One run whose reward sums aesthetic, clipscore, pickscore, alignment and remote (all with local weights),
    so each is loaded and called by the trainer; each is logged as reward/<name>/mean."""
    jpeg_server = serve(batch_window=0.0)
    components = {
        "aesthetic": {"clip_model": str(tiny_clip), "weights": str(aesthetic_weights)},
        "clipscore": {"clip_model": str(tiny_clip)},
        "pickscore": {"model": str(tiny_clip), "processor": str(tiny_clip)},
        "alignment": {"vlm": str(tiny_llava), "scorer": str(tiny_encoder), "scorer_layer": 2, "max_new_tokens": 4},
        "remote": {"url": jpeg_server.url, "timeout": 60},
    }
    sets = [f"reward.components.{label}.{key}={value}" for label, options in components.items()
            for key, value in options.items()]
    args = ["run", "--reward", "+".join(components), "--model", "sd14", "--set", f"model.pretrained={tiny_sd}",
            "--epochs", "1", "--set", "sample.num_steps=2", "--set", "sample.batch_size=4",
            "--set", "sample.batches_per_epoch=1", "--set", "train.batch_size=4", "--set", "train.grad_accum=1",
            "--logdir", str(tmp_path), "--run-name", "all"]
    for assignment in sets:
        args += ["--set", assignment]
    result = forked_cli.run(*args)
    assert result.returncode == 0, result.stderr[-3000:]
    record = json.loads((tmp_path / "all" / "metrics.jsonl").read_text().splitlines()[0])
    for label in components:
        assert math.isfinite(record[f"reward/{label}/mean"]), label
    assert record["reward/remote/mean"] < 0  # compressibility: minus the JPEG size
    assert abs(record["reward/mean"]) < 1e-5  # z-scored components sum to mean 0
    assert jpeg_server.batch_sizes == [2, 4]  # the start-up probe's two images, then the epoch's batch
