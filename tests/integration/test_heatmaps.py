"""Where the model looked, through the real daemon: each scored result on the stream carries a heatmap whose
peak falls on the finding (the pointing game), mapped onto the source image's pixels, letterboxed or not."""

from __future__ import annotations

import cv2
import numpy as np
import pytest

from appliance.v1 import scoring_pb2 as pb
from appliance.v1 import scoring_pb2_grpc as pb_grpc
from tests.series_data import pipeline_synth

from .conftest import drop

HELD_OUT_SEED = 4242  # training used seed 1, the build's sets 101 and 202, check.py 2 and 7
UPSCALE = 3  # the files are 3x the model's 64 px, so the daemon shrinks them as it would a real image
CROP = 56  # half the files keep 56 of the 64 columns: not square, so the model's input is letterboxed
MIN_POINTING = 0.90  # the figure: the peak on the mark in at least 90% of held-out images


Marked = tuple[str, bytes, list[tuple[float, float, float]], tuple[int, int]]


def _marked_images(count: int) -> list[Marked]:
    """16-bit PNGs with one to three discs each, where the discs are in the file's own pixels, and its size."""
    synth = pipeline_synth()
    rng = np.random.default_rng(HELD_OUT_SEED)
    out = []
    for i in range(count):
        image, discs = synth.make_marked_image(rng, lesion=True)
        if i % 2:
            left = int(rng.integers(0, synth.SIZE - CROP + 1))
            image = image[:, left : left + CROP]
            # A disc whose centre was cut away is no longer a mark on this image.
            discs = [(cy, cx - left, r) for cy, cx, r in discs if left <= cx < left + CROP]
        if not discs:
            continue
        big = cv2.resize(image, (image.shape[1] * UPSCALE, image.shape[0] * UPSCALE), interpolation=cv2.INTER_CUBIC)
        data = cv2.imencode(".png", np.round(np.clip(big, 0.0, 1.0) * 65535).astype(np.uint16))[1].tobytes()
        marks = [(cy * UPSCALE, cx * UPSCALE, r * UPSCALE) for cy, cx, r in discs]
        out.append((f"marked-{i:03d}.png", data, marks, (big.shape[0], big.shape[1])))
    return out


def _peak(h: pb.Heatmap) -> tuple[float, float, float]:
    """The hottest cell's centre in source pixels (x, y), and a cell's width there."""
    grid = np.frombuffer(h.values, dtype=np.uint8).reshape(h.height, h.width)
    row, col = np.unravel_index(int(np.argmax(grid)), grid.shape)
    e = h.extent
    cell_w, cell_h = (e.x1 - e.x0) / h.width, (e.y1 - e.y0) / h.height
    return e.x0 + (col + 0.5) * cell_w, e.y0 + (row + 0.5) * cell_h, max(cell_w, cell_h)


def _on_a_mark(h: pb.Heatmap, marks: list[tuple[float, float, float]]) -> bool:
    """The peak cell overlaps a disc: its centre is within the disc's radius plus half the cell's diagonal."""
    x, y, cell = _peak(h)
    return any(np.hypot(y - cy, x - cx) <= r + cell * 0.71 for cy, cx, r in marks)


def test_heatmap_peaks_fall_on_the_marks_through_the_daemon(make_daemon) -> None:
    d = make_daemon()
    d.start()
    images = _marked_images(80)
    marks = {name: m for name, _, m, _ in images}
    sizes = {name: size for name, _, _, size in images}
    for name, data, _, _ in images:
        drop(d.incoming, name, data)
    results = d.collect(len(images))

    assert {r.file_name for r in results} == set(marks)
    hits = []
    for r in results:
        assert r.outcome == pb.OUTCOME_SCORED, r.rejection.message
        h = r.heatmap
        assert (h.width, h.height, len(h.values)) == (8, 8, 64)
        assert (h.method, h.label) == ("cam", "lesion")
        assert max(h.values) == 255  # normalised per image
        rows, cols = sizes[r.file_name]
        if cols == rows:
            assert (h.extent.x0, h.extent.y0, h.extent.x1, h.extent.y1) == (0, 0, cols, rows)
        else:
            # Letterboxed: the 168 x 192 image fills 56 of the model's 64 columns, 4 of padding each side,
            # which is 12 source pixels each side at this scale.
            assert (h.extent.x0, h.extent.x1) == pytest.approx((-12.0, cols + 12.0))
            assert (h.extent.y0, h.extent.y1) == pytest.approx((0.0, rows))
        hits.append(_on_a_mark(h, marks[r.file_name]))
    share = sum(hits) / len(hits)
    print(f"pointing game: the peak fell on a mark in {sum(hits)} of {len(hits)} held-out images ({share:.1%})")
    assert share >= MIN_POINTING

    # The journal keeps it: the stored result read back by number carries the same map.
    with d.channel() as ch:
        stored = pb_grpc.ScoringStub(ch).GetResult(pb.GetResultRequest(sequence=results[0].sequence), timeout=10)
    assert stored.heatmap == results[0].heatmap

    # A Score call's answer carries it too, and a rejected input none.
    with d.channel() as ch:
        stub = pb_grpc.ScoringStub(ch)
        answer = stub.Score(pb.ScoreRequest(image=images[0][1], file_name="again.png"), timeout=30)
        bad = stub.Score(pb.ScoreRequest(image=b"\x89PNG\r\n\x1a\n truncated", file_name="bad.png"), timeout=30)
    first = next(r for r in results if r.file_name == images[0][0])
    assert answer.heatmap == first.heatmap  # the same bytes, the same map
    assert bad.outcome == pb.OUTCOME_REJECTED and not bad.HasField("heatmap")


def test_heatmaps_turned_off_in_the_config_are_not_computed_or_sent(make_daemon) -> None:
    d = make_daemon(inference={"heatmaps": False})
    d.start()
    name, data, _, _ = _marked_images(1)[0]
    drop(d.incoming, name, data)
    (result,) = d.collect(1)
    assert result.outcome == pb.OUTCOME_SCORED
    assert not result.HasField("heatmap")
