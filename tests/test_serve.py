"""`ddpmkit serve`: the page's requests against the command line's own images, its refusals, its queue, what it
writes (nothing), and the page itself in a real headless Chromium.

Independent truth is the command line: a draw with a seed is `ddpmkit sample` with that seed, sampler, steps, class
and guidance, an inpainting `ddpmkit inpaint` of the same PNG and mask, an edit `ddpmkit edit`; their files are
compared with the page's images pixel for pixel.
"""

from __future__ import annotations

import base64
import http.client
import io
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from conftest import one_error_line, tiny_run
from ddpmkit.cli import SAMPLE_DEFAULT_SAMPLER, main
from ddpmkit.errors import DdpmkitError
from ddpmkit.serve import App, is_loopback, make_server, status_of
from ddpmkit.serve import app as app_module

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")
BROWSER_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
                "--disable-sync", "--no-first-run"]
SIZE = 8  # the tiny run's images


# ---------------------------------------------------------------------------------------------- fixtures, helpers
@pytest.fixture(scope="module")
def cond_run(tmp_path_factory):
    """A tiny class-conditional digits run (8x8, T = 40, 10 classes and a null class), trained enough (30 steps at
    a high learning rate, no warm-up) that its images depend on the class."""
    return tiny_run(tmp_path_factory.mktemp("serve"), "cond", class_cond=True, steps=30, warmup=1, lr=3e-3,
                    batch_size=16, checkpoint_every=30)


@pytest.fixture(scope="module")
def app(cond_run):
    return App.open(cond_run, sample_sampler=SAMPLE_DEFAULT_SAMPLER, edit_sampler="ddim", log=lambda line: None)


@pytest.fixture(scope="module")
def server(app):
    """The app over HTTP on a free port of the loopback, in a thread; its log lines are kept in ``server.lines``."""
    lines = []
    srv = make_server(app, "127.0.0.1", 0, log=lines.append)
    srv.lines = lines
    thread = threading.Thread(target=srv.serve_forever, daemon=True)
    thread.start()
    yield srv
    srv.shutdown()
    srv.server_close()
    thread.join(timeout=30)


def pixels(url_or_path) -> np.ndarray:
    """The uint8 pixels of a data URL or a PNG file."""
    if isinstance(url_or_path, str) and url_or_path.startswith("data:image/png;base64,"):
        src = io.BytesIO(base64.b64decode(url_or_path.split(",", 1)[1]))
    else:
        src = url_or_path
    with Image.open(src) as im:
        return np.asarray(im).copy()


def data_url(a: np.ndarray, fmt: str = "PNG") -> str:
    buf = io.BytesIO()
    Image.fromarray(a).save(buf, format=fmt)
    return f"data:image/{fmt.lower()};base64," + base64.b64encode(buf.getvalue()).decode()


def handle(app, kind, body):
    """The events of one request answered by the app (no HTTP)."""
    events = []
    app.handle(kind, body, events.append)
    return events


def refusal(app, kind, body) -> tuple[int, dict]:
    with pytest.raises(DdpmkitError) as e:
        handle(app, kind, body)
    return status_of(e.value)


def post(server, path, body, headers=None, raw: bytes | None = None):
    """(status, content type, the JSON answer or the list of streamed events)."""
    host, port = server.server_address[:2]
    c = http.client.HTTPConnection(host, port, timeout=120)
    data = raw if raw is not None else json.dumps(body).encode()
    c.request("POST", path, body=data, headers={"Content-Type": "application/json", **(headers or {})})
    r = c.getresponse()
    text = r.read().decode()
    c.close()
    ctype = r.getheader("Content-Type", "")
    if ctype.startswith("application/x-ndjson"):
        return r.status, ctype, [json.loads(line) for line in text.splitlines() if line.strip()]
    return r.status, ctype, json.loads(text)


def raw_request(server, data: bytes) -> tuple[int, dict]:
    """Send bytes as they are; (status, JSON answer)."""
    host, port = server.server_address[:2]
    with socket.create_connection((host, port), timeout=60) as s:
        s.sendall(data)
        s.shutdown(socket.SHUT_WR)
        answer = b""
        while chunk := s.recv(65536):
            answer += chunk
    head, _, body = answer.partition(b"\r\n\r\n")
    return int(head.split()[1]), json.loads(body)


def snapshot(folder: Path) -> dict:
    """Every file and folder under ``folder`` with its size and modification time."""
    return {str(p.relative_to(folder)): (p.is_dir(), p.stat().st_size, p.stat().st_mtime_ns)
            for p in sorted(folder.rglob("*"))}


# ---------------------------------------------------------------------------------------------- against the CLI
DRAWS = [
    # (the page's request, the same with `ddpmkit sample`)
    ({"sampler": "ddim", "steps": 5, "seed": 3, "n": 2, "class": "7", "guidance": 0.5},
     ["--sampler", "ddim", "--steps", "5", "--seed", "3", "--n", "2", "--class", "7", "--guidance", "0.5"]),
    ({"sampler": "ddim", "steps": 6, "options": {"eta": 0.7}, "seed": 11, "n": 3, "guidance": 0},
     ["--sampler", "ddim", "--steps", "6", "--eta", "0.7", "--seed", "11", "--n", "3", "--guidance", "0"]),
    ({"steps": 4, "seed": 5, "n": 2, "class": "2"},  # the default sampler and guidance, as `sample`'s
     ["--steps", "4", "--seed", "5", "--n", "2", "--class", "2"]),
    ({"sampler": "heun", "steps": 3, "spacing": "karras", "seed": 2, "n": 1, "class": "9", "guidance": 1.5},
     ["--sampler", "heun", "--steps", "3", "--timesteps", "karras", "--seed", "2", "--n", "1", "--class", "9",
      "--guidance", "1.5"]),
]


@pytest.mark.parametrize("body, flags", DRAWS, ids=["ddim-class", "ddim-eta-in-turn", "default", "heun-karras"])
def test_a_draw_is_the_cli_sample(app, cond_run, tmp_path, body, flags):
    events = handle(app, "sample", body)
    done = events[-1]
    assert [e["type"] for e in events[:2]] == ["start", "step"] and done["type"] == "done"
    out = tmp_path / "cli"
    assert main(["sample", str(cond_run), *flags, "--out", str(out), "--quiet"]) == 0
    files = sorted(out.glob("sample_*.png"))
    assert len(files) == len(done["images"]) == body["n"]
    for url, f in zip(done["images"], files):
        a, b = pixels(url), pixels(f)
        assert a.shape == b.shape == (SIZE, SIZE) and np.array_equal(a, b), f
    labels = [int(line.split(",")[1]) for line in (out / "labels.csv").read_text().splitlines()[1:]]
    assert done["labels"] == labels
    assert events[0]["sampler"] == (body.get("sampler") or SAMPLE_DEFAULT_SAMPLER)


def test_class_none_draws_the_unconditional_model(app, cond_run, tmp_path):
    # `edit --strength 1` is plain sampling from the same noise (SDEdit's end): with --class none it is the null
    # class, which `sample` cannot name
    done = handle(app, "sample", {"sampler": "ddim", "steps": 5, "seed": 4, "n": 2, "class": "none"})[-1]
    img = tmp_path / "any.png"
    Image.fromarray(np.zeros((SIZE, SIZE), np.uint8)).save(img)
    out = tmp_path / "cli"
    assert main(["edit", str(cond_run), "--image", str(img), "--strength", "1", "--class", "none", "--sampler",
                 "ddim", "--steps", "5", "--seed", "4", "--n", "2", "--out", str(out)]) == 0
    for url, f in zip(done["images"], sorted(out.glob("edit_s1_000_*.png"))):
        assert np.array_equal(pixels(url), pixels(f))
    assert done["labels"] == [10, 10]  # the null class
    # and it is not a class's draw
    seven = handle(app, "sample", {"sampler": "ddim", "steps": 5, "seed": 4, "n": 2, "class": "7"})[-1]
    assert not np.array_equal(pixels(seven["images"][0]), pixels(done["images"][0]))


def _hole() -> np.ndarray:
    """A mask file's pixels: white (known) but for a 3x4 hole."""
    m = np.full((SIZE, SIZE), 255, np.uint8)
    m[2:5, 3:7] = 0
    return m


def test_inpaint_is_the_cli_inpaint(app, cond_run, tmp_path):
    source = handle(app, "sample", {"sampler": "ddim", "steps": 5, "seed": 8, "n": 1, "class": "3"})[-1]["images"][0]
    Image.fromarray(pixels(source)).save(tmp_path / "source.png")
    Image.fromarray(_hole()).save(tmp_path / "mask.png")
    body = {"image": source, "mask": data_url(_hole()), "steps": 10, "jump": 2, "resample": 3, "seed": 6, "n": 2,
            "class": "3", "guidance": 0.5}
    events = handle(app, "inpaint", body)
    done = events[-1]
    out = tmp_path / "cli"
    assert main(["inpaint", str(cond_run), "--image", str(tmp_path / "source.png"), "--mask",
                 str(tmp_path / "mask.png"), "--steps", "10", "--jump", "2", "--resample", "3", "--seed", "6",
                 "--n", "2", "--class", "3", "--guidance", "0.5", "--out", str(out)]) == 0
    files = sorted(out.glob("inpainted_000_*.png"))
    assert len(files) == len(done["images"]) == 2
    known = _hole() == 255
    for url, f in zip(done["images"], files):
        a = pixels(url)
        assert np.array_equal(a, pixels(f))
        assert np.array_equal(a[known], pixels(source)[known])  # the known pixels, exactly
        assert (a[~known] != pixels(source)[~known]).any()  # the hole, drawn anew
    assert events[0]["model_calls"] == events[0]["total"] == len(events) - 2  # every step streamed (fewer than 60)


def test_edit_is_the_cli_edit(app, cond_run, tmp_path):
    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, (SIZE, SIZE), dtype=np.uint8)
    Image.fromarray(image).save(tmp_path / "in.png")
    body = {"image": data_url(image), "strength": 0.6, "sampler": "ddim", "steps": 10, "seed": 1, "n": 2,
            "class": "4", "guidance": 0.3}
    done = handle(app, "edit", body)[-1]
    out = tmp_path / "cli"
    assert main(["edit", str(cond_run), "--image", str(tmp_path / "in.png"), "--strength", "0.6", "--sampler", "ddim",
                 "--steps", "10", "--seed", "1", "--n", "2", "--class", "4", "--guidance", "0.3",
                 "--out", str(out)]) == 0
    files = sorted(out.glob("edit_s0.6_000_*.png"))
    assert len(files) == 2
    for url, f in zip(done["images"], files):
        assert np.array_equal(pixels(url), pixels(f))


def test_a_distilled_run_draws_with_its_own_sampler_and_weight_only(cond_run, tmp_path):
    student = tmp_path / "student"
    assert main(["distill", str(cond_run), "--out", str(student), "--steps", "1", "--teacher-steps", "4",
                 "--round-steps", "3", "--batch-size", "16", "--quiet"]) == 0
    app = App.open(student, sample_sampler=SAMPLE_DEFAULT_SAMPLER, log=lambda line: None)
    info = app.info()
    own = [s for s in info["samplers"] if s["name"] == info["sampler"]][0]
    assert info["guidance"]["fixed"] and info["sampler"] != SAMPLE_DEFAULT_SAMPLER and own["steps"] == 1
    events = handle(app, "sample", {"seed": 1, "n": 2, "class": "3"})
    assert events[0]["sampler"] == info["sampler"] and events[0]["steps"] == 1
    assert events[0]["guidance"] == info["guidance"]["default"]
    out = tmp_path / "cli"
    assert main(["sample", str(student), "--seed", "1", "--n", "2", "--class", "3", "--out", str(out), "--quiet"]) == 0
    for url, f in zip(events[-1]["images"], sorted(out.glob("sample_*.png"))):
        assert np.array_equal(pixels(url), pixels(f))
    status, payload = refusal(app, "sample", {"class": "3", "guidance": 0.7})
    assert status == 400 and payload["field"] == "guidance" and "distilled at guidance" in payload["error"]


@pytest.fixture(scope="module")
def latent_run(tmp_path_factory):
    """A tiny latent run: an f = 2 autoencoder of 8x8 digits and a U-Net over its 2x4x4 latents (test_latent_edit's)."""
    from test_latent_edit import train_tiny_latent_run

    return train_tiny_latent_run(tmp_path_factory.mktemp("serve-latent"))


def test_a_latent_run_draws_inpaints_and_edits_in_pixels_as_the_cli(latent_run, tmp_path):
    app = App.open(latent_run, sample_sampler=SAMPLE_DEFAULT_SAMPLER, log=lambda line: None)
    assert app.info()["latent"] and app.info()["image"] == [1, SIZE, SIZE]
    events = handle(app, "sample", {"sampler": "ddim", "steps": 4, "seed": 2, "n": 2})
    assert all(pixels(u).shape == (SIZE, SIZE) for e in events[1:-1] for u in e["x"])  # the chain decoded
    out = tmp_path / "sample"
    assert main(["sample", str(latent_run), "--sampler", "ddim", "--steps", "4", "--seed", "2", "--n", "2", "--out",
                 str(out), "--quiet"]) == 0
    for url, f in zip(events[-1]["images"], sorted(out.glob("sample_*.png"))):
        assert np.array_equal(pixels(url), pixels(f))
    source = events[-1]["images"][0]
    Image.fromarray(pixels(source)).save(tmp_path / "source.png")
    hole = np.full((SIZE, SIZE), 255, np.uint8)
    hole[SIZE // 2:] = 0  # whole 2x2 blocks
    Image.fromarray(hole).save(tmp_path / "mask.png")
    page = handle(app, "inpaint", {"image": source, "mask": data_url(hole), "steps": 4, "jump": 2, "resample": 2,
                                   "seed": 3})[-1]["images"][0]
    assert main(["inpaint", str(latent_run), "--image", str(tmp_path / "source.png"), "--mask",
                 str(tmp_path / "mask.png"), "--steps", "4", "--jump", "2", "--resample", "2", "--seed", "3", "--n",
                 "1", "--out", str(tmp_path / "inpaint")]) == 0
    assert np.array_equal(pixels(page), pixels(next((tmp_path / "inpaint").glob("inpainted_000_*.png"))))
    assert np.array_equal(pixels(page)[hole == 255], pixels(source)[hole == 255])  # pasted back exactly
    page = handle(app, "edit", {"image": source, "strength": 0.5, "sampler": "ddim", "steps": 6, "seed": 3})[-1]
    assert main(["edit", str(latent_run), "--image", str(tmp_path / "source.png"), "--strength", "0.5", "--sampler",
                 "ddim", "--steps", "6", "--seed", "3", "--n", "1", "--out", str(tmp_path / "edit")]) == 0
    assert np.array_equal(pixels(page["images"][0]), pixels(next((tmp_path / "edit").glob("edit_s0.5_000_*.png"))))
    # a mask that leaves no 2x2 block wholly known: the latent model would see nothing
    stripes = np.full((SIZE, SIZE), 255, np.uint8)
    stripes[:, ::2] = 0
    status, payload = refusal(app, "inpaint", {"image": source, "mask": data_url(stripes)})
    assert status == 400 and "no 2x2 block" in payload["error"]


def test_the_chain_is_streamed_step_by_step(app, monkeypatch):
    events = handle(app, "sample", {"sampler": "ddim", "steps": 5, "seed": 0, "n": 3, "class": "1"})
    steps = [e for e in events if e["type"] == "step"]
    assert [e["step"] for e in steps] == [-1, 0, 1, 2, 3, 4]  # the noise x_T, then every step
    assert steps[0]["x0"] is None and all(len(e["x"]) == len(e["x0"]) == 3 for e in steps[1:])
    # DDIM's last step goes to alpha_bar = 1: its x_t is the final image
    assert steps[-1]["x"] == events[-1]["images"]
    assert [e["t"] for e in steps[1:]] == sorted((e["t"] for e in steps[1:]), reverse=True)
    # a long chain is thinned to MAX_FRAMES steps, the last always sent
    monkeypatch.setattr(app_module, "MAX_FRAMES", 7)
    events = handle(app, "sample", {"sampler": "ddpm", "seed": 0, "n": 1, "class": "1"})  # all T = 40 steps
    sent = [e["step"] for e in events if e["type"] == "step"]
    assert sent[0] == -1 and sent[1] == 0 and sent[-1] == 39 and len(sent) == 1 + 7
    assert events[0]["total"] == 40


# ---------------------------------------------------------------------------------------------- refusals
def _png(w, h, mode="L") -> str:
    return data_url(np.zeros((h, w) if mode == "L" else (h, w, 3), np.uint8))


REFUSALS = [
    ("sample", {"sampler": "nope"}, 400, "sampler", "unknown sampler 'nope'"),
    ("sample", {"steps": 0}, 400, "steps", "[1, T] = [1, 40], got 0"),
    ("sample", {"steps": 10**9}, 400, "steps", "got 1000000000"),
    ("sample", {"steps": 2.5}, 400, "steps", "must be an integer"),
    ("sample", {"spacing": "sideways"}, 400, "spacing", "unknown spacing"),
    ("sample", {"sampler": "ddim", "options": {"eta": 3}}, 400, "eta", "eta must be <= 1"),
    ("sample", {"sampler": "ddpm", "options": {"eta": 0.5}}, 400, "sampler", "has no option eta"),
    ("sample", {"class": "11"}, 400, "class", "no class '11'"),
    ("sample", {"class": "7", "guidance": -1}, 400, "guidance", "must be a number >= 0"),
    ("sample", {"class": "none", "guidance": 2}, 400, "guidance", "nothing to guide"),
    ("sample", {"class": "all", "n": 2}, 400, "n", "20 images in all"),
    ("sample", {"n": 17}, 400, "n", "[1, 16]"),
    ("sample", {"n": "4"}, 400, "n", "must be an integer"),
    ("sample", {"seed": True}, 400, "seed", "must be an integer"),
    ("sample", {"stpes": 5}, 400, "stpes", "unknown field 'stpes'"),
    ("sample", ["not", "an", "object"], 400, None, "must be a JSON object"),
    ("inpaint", {"mask": "MASK"}, 400, "image", "missing field 'image'"),
    ("inpaint", {"image": "IMAGE"}, 400, "mask", "missing field 'mask'"),
    ("inpaint", {"image": "data:text/plain;base64," + base64.b64encode(b"hello").decode(), "mask": "MASK"}, 400,
     "image", "not an image"),
    ("inpaint", {"image": "http://example.com/x.png", "mask": "MASK"}, 400, "image", "must be a data URL"),
    ("inpaint", {"image": "data:image/png;base64,@@@", "mask": "MASK"}, 400, "image", "base64"),
    ("inpaint", {"image": "PNG:5000x1", "mask": "MASK"}, 413, "image", "too large"),
    ("inpaint", {"image": "PNG:16x16", "mask": "MASK"}, 400, "image", "16x16 pixels, the model's images are 8x8"),
    ("inpaint", {"image": "IMAGE", "mask": "PNG:16x16"}, 400, "mask", "16x16 pixels"),
    ("inpaint", {"image": "IMAGE", "mask": "ALL_KNOWN"}, 400, "mask", "every pixel is known"),
    ("inpaint", {"image": "IMAGE", "mask": "NONE_KNOWN"}, 400, None, "no pixel is known"),
    ("inpaint", {"image": "IMAGE", "mask": "MASK", "jump": 0}, 400, "jump", "[1, 1000]"),
    ("inpaint", {"image": "IMAGE", "mask": "MASK", "resample": 101}, 400, "resample", "[1, 100]"),
    ("inpaint", {"image": "IMAGE", "mask": "MASK", "steps": 41}, 400, "steps", "[1, 40]"),
    ("inpaint", {"image": "IMAGE", "mask": "MASK", "class": "12"}, 400, "class", "no class '12'"),
    ("edit", {"strength": 0.5}, 400, "image", "missing field 'image'"),
    ("edit", {"image": "IMAGE", "strength": 2}, 400, None, "strength must lie in [0, 1]"),
    ("edit", {"image": "IMAGE", "sampler": "ddim", "steps": 0}, 400, "steps", "got 0"),
    ("edit", {"image": "IMAGE", "class": "none", "guidance": 1}, 400, None, "nothing to guide"),
]


def _fill(body):
    """The placeholders of REFUSALS as data URLs."""
    if not isinstance(body, dict):
        return body
    hole = _hole()
    known, unknown = np.full_like(hole, 255), np.zeros_like(hole)
    named = {"IMAGE": _png(SIZE, SIZE), "MASK": data_url(hole), "ALL_KNOWN": data_url(known),
             "NONE_KNOWN": data_url(unknown)}
    out = {}
    for k, v in body.items():
        if isinstance(v, str) and v.startswith("PNG:"):
            w, h = (int(x) for x in v[4:].split("x"))
            v = _png(w, h)
        out[k] = named.get(v, v) if isinstance(v, str) else v
    return out


@pytest.mark.parametrize("kind, body, status, field, words", REFUSALS)
def test_a_bad_request_is_a_4xx_with_one_line(app, kind, body, status, field, words):
    got, payload = refusal(app, kind, _fill(body))
    assert got == status and payload.get("field") == field, payload
    assert words in payload["error"] and "\n" not in payload["error"], payload


@pytest.fixture(scope="module")
def plain_run(tmp_path_factory):
    """A tiny unconditional run."""
    return tiny_run(tmp_path_factory.mktemp("serve-plain"), "plain", steps=2)


def test_an_unconditional_run_refuses_a_class_and_a_weight(plain_run):
    plain = App.open(plain_run, log=lambda line: None)
    assert plain.info()["classes"] is None and plain.info()["guidance"] is None
    for body, field in (({"guidance": 0.5}, "guidance"), ({"class": "3"}, "class"), ({"class": "none"}, "class")):
        status, payload = refusal(plain, "sample", body)
        assert status == 400 and payload["field"] == field and "unconditional" in payload["error"], payload
    done = handle(plain, "sample", {"sampler": "ddim", "steps": 3, "n": 2})[-1]
    assert len(done["images"]) == 2 and done["labels"] is None


def test_http_refusals_are_json(server):
    host, port = server.server_address[:2]
    body = json.dumps({"steps": 3}).encode()
    cases = [
        (post(server, "/api/sample", None, raw=b"{not json"), 400, "not valid JSON"),
        (post(server, "/api/sample", None, raw=b"[[[[" * 100000), 400, "not valid JSON"),
        (post(server, "/api/sample", None, raw=body, headers={"Content-Type": "text/plain"}), 415, "application/json"),
        (post(server, "/api/nothing", {}), 404, "nothing to POST"),
        (post(server, "/api/sample", {"steps": 0}), 400, "steps"),
    ]
    for (status, ctype, payload), want, words in cases:
        assert status == want and ctype == "application/json" and words in payload["error"], (status, payload)
    head = (f"POST /api/sample HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nContent-Type: application/json\r\n").encode()
    assert raw_request(server, head + b"\r\n" + body)[0] == 411  # no Content-Length
    status, payload = raw_request(server, head + b"Content-Length: 999999999\r\n\r\n{}")
    assert status == 413 and "more than" in payload["error"]  # refused unread
    status, payload = raw_request(server, head + b"Content-Length: 100\r\n\r\n{}")
    assert status == 400 and "ended after 2 of its 100 bytes" in payload["error"]
    status, payload = raw_request(server, b"GET / HTTP/x.y\r\n\r\n")
    assert 400 <= status < 500 and payload["error"]
    # another site's name for this address (DNS rebinding): refused
    status, payload = raw_request(server, b"GET /api/info HTTP/1.1\r\nHost: evil.example:80\r\n\r\n")
    assert status == 403 and "evil.example" in payload["error"]
    c = http.client.HTTPConnection(host, port, timeout=60)
    for method, path, want in (("GET", "/api/sample", 405), ("PUT", "/", 405), ("DELETE", "/api/info", 405),
                               ("GET", "/nothing", 404)):
        c.request(method, path)
        r = c.getresponse()
        assert r.status == want and "error" in json.loads(r.read()), (method, path)
        c.close()


def test_an_unexpected_error_is_a_500_and_the_server_goes_on(server, app, monkeypatch):
    def boom(body):
        raise RuntimeError("boom\nsecond line")

    monkeypatch.setattr(app, "_plan_sample", boom)
    status, _, payload = post(server, "/api/sample", {})
    assert status == 500 and payload == {"error": "internal error: RuntimeError: boom"}
    assert any(line == "error: /api/sample: RuntimeError: boom" for line in server.lines)
    monkeypatch.setattr(app, "info", lambda: 1 / 0)
    c = http.client.HTTPConnection(*server.server_address[:2], timeout=60)
    c.request("GET", "/api/info")
    r = c.getresponse()
    assert r.status == 500 and json.loads(r.read()) == {"error": "internal error: ZeroDivisionError: division by zero"}
    c.close()
    monkeypatch.undo()
    status, _, events = post(server, "/api/sample", {"sampler": "ddim", "steps": 2})
    assert status == 200 and events[-1]["type"] == "done"


def test_a_client_that_goes_away_stops_the_work_and_frees_the_model(app):
    seen = []

    def emit(event):
        seen.append(event["type"])
        if len(seen) == 3:
            raise BrokenPipeError("gone")

    with pytest.raises(BrokenPipeError):
        app.handle("sample", {"sampler": "ddpm", "seed": 0, "n": 1, "class": "0"}, emit)
    assert seen == ["start", "step", "step"] and not app._lock.locked()
    assert handle(app, "sample", {"sampler": "ddim", "steps": 2})[-1]["type"] == "done"


def test_stopping_ends_the_work_at_its_next_step_and_refuses_new_requests(cond_run):
    app = App.open(cond_run, log=lambda line: None)  # its own: a stopped app stays stopped
    started, go, seen, failure = threading.Event(), threading.Event(), [], {}

    def emit(event):
        seen.append(event.get("step", event["type"]))
        if event["type"] == "step":  # x_T: hold the work here until the app is told to stop
            started.set()
            go.wait(timeout=120)

    def work():
        try:
            app.handle("sample", {"sampler": "ddim", "steps": 5, "class": "2"}, emit)
        except DdpmkitError as e:
            failure["status"] = status_of(e)

    t = threading.Thread(target=work)
    t.start()
    assert started.wait(timeout=120)
    stopper = threading.Thread(target=lambda: failure.setdefault("free", app.stop(timeout=120)))
    stopper.start()
    while not app._stopping.is_set():  # stop() has raised the flag; now let the held step go on
        time.sleep(0.01)
    go.set()
    t.join(timeout=120)
    stopper.join(timeout=120)
    assert seen == ["start", -1]  # no step after the flag
    assert failure["status"] == (503, {"error": "the server is stopping"}) and failure["free"]
    assert refusal(app, "sample", {"steps": 2}) == (503, {"error": "the server is stopping"})


# ---------------------------------------------------------------------------------------------- the queue
def test_concurrent_requests_queue_and_all_are_answered(server, app):
    bodies = [{"sampler": "ddim", "steps": 4, "seed": s, "n": 2, "class": str(s % 10)} for s in range(6)]
    alone = [handle(app, "sample", b)[-1]["images"] for b in bodies]
    answers = [None] * len(bodies)

    def ask(k):
        answers[k] = post(server, "/api/sample", bodies[k])

    threads = [threading.Thread(target=ask, args=(k,)) for k in range(len(bodies))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=300)
    for k, (status, _, events) in enumerate(answers):
        assert status == 200 and events[-1]["type"] == "done", events
        assert events[-1]["images"] == alone[k]  # the same images as one at a time


def test_a_full_queue_is_answered_503(app, monkeypatch):
    monkeypatch.setattr(app_module, "MAX_WAITING", 1)
    results = {}
    app._lock.acquire()  # the model busy
    try:
        waiter = threading.Thread(target=lambda: results.setdefault("first", handle(app, "sample", {"steps": 2})))
        waiter.start()
        deadline = time.monotonic() + 60
        while app._waiting < 1 and time.monotonic() < deadline:  # the first request is waiting for the model
            time.sleep(0.01)
        status, payload = refusal(app, "sample", {"steps": 2})
        assert status == 503 and "busy" in payload["error"]
    finally:
        app._lock.release()
    waiter.join(timeout=120)
    assert results["first"][-1]["type"] == "done"


# ---------------------------------------------------------------------------------------------- files
def test_nothing_is_written(server, cond_run, tmp_path, monkeypatch):
    cwd, tmp, home = tmp_path / "cwd", tmp_path / "tmp", tmp_path / "home"
    for d in (cwd, tmp, home):
        d.mkdir()
    monkeypatch.chdir(cwd)
    monkeypatch.setattr(tempfile, "tempdir", str(tmp))
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.setenv("XDG_CACHE_HOME", str(home / ".cache"))
    before = snapshot(cond_run)
    image = post(server, "/api/sample", {"sampler": "ddim", "steps": 3, "class": "5"})[2][-1]["images"][0]
    assert post(server, "/api/inpaint", {"image": image, "mask": data_url(_hole()), "steps": 4, "jump": 2,
                                         "resample": 2, "class": "5"})[0] == 200
    assert post(server, "/api/edit", {"image": _png(20, 12, "RGB"), "resize": True, "strength": 0.5,
                                      "sampler": "ddim", "steps": 4})[0] == 200
    assert post(server, "/api/sample", {"steps": 0})[0] == 400
    assert snapshot(cond_run) == before
    assert [list(d.iterdir()) for d in (cwd, tmp, home)] == [[], [], []]


# ---------------------------------------------------------------------------------------------- the command
def test_serve_refuses_a_missing_or_broken_run_in_one_line(cond_run, tmp_path, capsys):
    assert main(["serve", str(tmp_path / "missing")]) == 2
    one_error_line(capsys, "missing")
    broken = tmp_path / "broken"
    shutil.copytree(cond_run, broken)
    for f in broken.rglob("*.safetensors"):
        f.write_bytes(b"not weights")
    assert main(["serve", str(broken), "--port", "0"]) == 2
    one_error_line(capsys)
    assert main(["serve", str(cond_run), "--port", "70000"]) == 2
    one_error_line(capsys, "--port")
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        assert main(["serve", str(cond_run), "--port", str(taken.getsockname()[1])]) == 2
        one_error_line(capsys, "cannot listen on 127.0.0.1")


def test_serve_warns_off_the_loopback_and_stops_on_ctrl_c(cond_run, monkeypatch, capsys):
    import ddpmkit.serve as serve_package

    class Interrupted:
        url = "http://0.0.0.0:1234/"
        closed = False

        def serve_forever(self):
            raise KeyboardInterrupt

        def server_close(self):
            Interrupted.closed = True

    monkeypatch.setattr(serve_package, "make_server", lambda app, host, port: Interrupted())
    assert main(["serve", str(cond_run), "--host", "0.0.0.0", "--port", "0"]) == 0
    out, err = capsys.readouterr()
    assert out.strip() == f"serving {cond_run} at http://0.0.0.0:1234/ (Ctrl-C to stop)"
    assert err.startswith("warning: --host 0.0.0.0 is not this machine only") and err.rstrip().endswith("stopped")
    assert len(err.strip().splitlines()) == 2 and Interrupted.closed
    assert is_loopback("127.0.0.1") and is_loopback("localhost") and is_loopback("::1") and is_loopback("[::1]")
    assert not is_loopback("0.0.0.0") and not is_loopback("192.168.1.2") and not is_loopback("example.com")


def test_serve_prints_its_address_answers_and_stops_on_sigint(cond_run, tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    # Ctrl-C as a terminal delivers it: the server starts with SIGINT's default action even where this process runs
    # with it ignored (a background job, nohup), which a child would inherit and Python would then leave ignored
    proc = subprocess.Popen([sys.executable, "-m", "ddpmkit", "serve", str(cond_run), "--port", "0"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=tmp_path,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    try:
        line = proc.stdout.readline()
        assert line.startswith(f"serving {cond_run} at http://127.0.0.1:") and "Ctrl-C" in line, line
        url = line.split(" at ", 1)[1].split()[0]
        port = int(url.rsplit(":", 1)[1].strip("/"))
        c = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
        c.request("GET", "/")
        r = c.getresponse()
        page = r.read().decode()
        assert r.status == 200 and "<canvas" in page and "http://" not in page and "https://" not in page
        assert "connect-src 'self'" in r.getheader("Content-Security-Policy")
        c.close()
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode == 0, err
    # the request's log line and "stopped" may come in either order: the log line is written after the answer
    assert "Traceback" not in err and "stopped" in err.splitlines(), err
    assert list(tmp_path.iterdir()) == [], list(tmp_path.rglob("*"))  # nothing written where it ran


# ---------------------------------------------------------------------------------------------- the page
@pytest.fixture(scope="module")
def browser():
    if CHROMIUM is None and not os.environ.get("CI"):
        pytest.skip("no Chromium on this machine")
    assert CHROMIUM, "CI installs Debian's chromium in .ci/run"
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=BROWSER_ARGS)
        yield b
        b.close()


def test_the_page_draws_and_inpaints_in_a_real_browser(browser, server, cond_run, tmp_path):
    page = browser.new_page(viewport={"width": 1280, "height": 860})
    requests, errors = [], []
    page.on("request", lambda r: requests.append(r.url))
    page.on("pageerror", lambda e: errors.append(str(e)))
    expected = "the server responded with a status of 400"  # the refused draw below
    page.on("console", lambda m: errors.append(m.text) if m.type == "error" and expected not in m.text else None)
    page.goto(server.url)
    page.wait_for_selector("#sampler option[value=ddim]", state="attached")
    assert page.input_value("#sampler") == SAMPLE_DEFAULT_SAMPLER  # `sample`'s default, preselected

    # a refused request shows the server's line and marks the field
    page.select_option("#sampler", "ddim")
    page.fill("#steps", "0")
    page.click("#draw")
    page.wait_for_selector("#status.error")
    assert "steps must lie in [1, T]" in page.inner_text("#status")
    assert "bad" in page.get_attribute("#steps", "class")

    # a draw: the chain shows each step, the results are the command line's images
    page.fill("#steps", "5")
    page.fill("#seed", "3")
    page.fill("#n", "2")
    page.select_option("#class", "7")
    page.fill("#guidance", "0.5")
    page.click("#draw")
    page.wait_for_selector("#results img.final >> nth=1")  # CSS only: the page's policy forbids eval
    assert not page.get_attribute("#status", "class")
    finals = page.eval_on_selector_all("#results img.final", "els => els.map(e => e.src)")
    assert all(src.startswith("data:image/png;base64,") for src in finals)
    assert page.eval_on_selector_all("#strip .frame", "els => els.length") == 6  # x_T and 5 steps
    assert page.eval_on_selector_all("#chain-x0 img", "els => els.length") == 2
    shot = tmp_path / "serve.png"
    page.screenshot(path=str(shot))
    if os.environ.get("DDPMKIT_SERVE_SCREENSHOT"):  # the picture of docs/serve.md
        shutil.copyfile(shot, os.environ["DDPMKIT_SERVE_SCREENSHOT"])
    out = tmp_path / "cli"
    assert main(["sample", str(cond_run), "--sampler", "ddim", "--steps", "5", "--seed", "3", "--n", "2", "--class",
                 "7", "--guidance", "0.5", "--out", str(out), "--quiet"]) == 0
    for src, f in zip(finals, sorted(out.glob("sample_*.png"))):
        assert np.array_equal(pixels(src), pixels(f))

    # paint a stroke with the mouse across the middle of the first sample, inpaint it
    box = page.locator("#canvas").bounding_box()
    y = box["y"] + box["height"] * 0.5
    page.mouse.move(box["x"] + box["width"] * 0.3, y)
    page.mouse.down()
    for k in range(1, 11):
        page.mouse.move(box["x"] + box["width"] * (0.3 + 0.04 * k), y)
    page.mouse.up()
    mask = np.array(page.evaluate("Array.from(window.ddpmkitPage.mask)"), dtype=bool).reshape(SIZE, SIZE)
    assert mask.any() and not mask.all()
    rows, cols = np.nonzero(mask)
    assert rows.min() >= SIZE // 2 - 2 and rows.max() <= SIZE // 2 + 1  # where the stroke went
    assert cols.min() >= 1 and cols.max() <= SIZE - 2
    page.fill("#inpaint-steps", "10")
    page.fill("#jump", "2")
    page.fill("#resample", "2")
    page.click("#inpaint")
    page.wait_for_selector("#results-title:text-matches('^Inpainted')")
    source = pixels(page.evaluate("window.ddpmkitPage.source.url"))
    assert np.array_equal(source, pixels(finals[0]))
    sent = page.evaluate("window.ddpmkitPage.sent")
    assert np.array_equal(pixels(sent["mask"])[..., 0] == 0, mask)  # the mask the page sent is the one painted
    results = page.eval_on_selector_all("#results img.final", "els => els.map(e => e.src)")
    assert len(results) == 2
    for src in results:
        a = pixels(src)
        assert np.array_equal(a[~mask], source[~mask])  # unchanged outside the mask
        assert (a[mask] != source[mask]).any()  # drawn anew inside
    assert page.eval_on_selector_all("#strip .frame", "els => els.length") >= 2

    # SDEdit of an uploaded image of another size (resized, as --resize)
    upload = tmp_path / "upload.png"
    Image.fromarray(np.random.default_rng(1).integers(0, 256, (20, 30, 3), dtype=np.uint8)).save(upload)
    page.set_input_files("#upload", str(upload))
    page.wait_for_selector("#source-note:has-text('upload.png')")
    page.fill("#strength", "0.5")
    page.click("#sdedit")
    page.wait_for_selector("#results-title:text-matches('^Edited')")
    assert page.eval_on_selector_all("#results img.final", "els => els.length") == 2
    assert not page.get_attribute("#status", "class"), page.inner_text("#status")

    assert not errors, errors
    assert all(u.startswith(server.url) or u.startswith("data:") for u in requests), requests  # nothing else
    page.close()

