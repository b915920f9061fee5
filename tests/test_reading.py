"""The reader: read-ahead equal to a plain serial read byte for byte, and the copy protocol that
keeps a host buffer from being refilled before the device copy out of it has run."""

from __future__ import annotations

import threading
import time

import pytest
import torch
from safetensors.torch import save_file

from raymerge.errors import SourceError
from raymerge.reading import TensorReader
from raymerge.sources.checkpoint import Checkpoint

SLICE_BYTES = 4096  # small slices: every tensor below is read in many


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Checkpoint:
    """Tensors of 1 to ~40 slices, rows that straddle no slice, a row larger than a slice,
    a scalar and an empty tensor, in two dtypes."""
    directory = tmp_path_factory.mktemp("reading")
    generator = torch.Generator().manual_seed(0)
    tensors = {
        "wide": torch.randn(37, 1001, generator=generator).to(torch.bfloat16),
        "tall": torch.randn(40_000, generator=generator),
        "small": torch.randn(3, 5, generator=generator),
        "row_over_slice": torch.randn(5, 3000, generator=generator),  # 12 kB rows
        "scalar": torch.tensor(2.5),
        "empty": torch.zeros(0, 4),
    }
    save_file(tensors, directory / "model.safetensors")
    return Checkpoint.open("reading", directory)


def expected(checkpoint: Checkpoint, name: str) -> torch.Tensor:
    from safetensors import safe_open

    with safe_open(checkpoint.tensors[name].file, framework="pt") as handle:
        return handle.get_tensor(name)


class LateCopier:
    """Stands in for a busy CUDA stream: each copy out of the host buffer happens on another
    thread some milliseconds after it was asked for. The wait it hands back returns once that
    copy has run; a reader that refilled the buffer before waiting would copy wrong bytes."""

    def __init__(self, delay: float = 0.004) -> None:
        self.delay = delay
        self.threads: list[threading.Thread] = []

    def __call__(self, host: torch.Tensor):
        target = torch.empty_like(host)

        def copy_late():
            time.sleep(self.delay)
            target.copy_(host)

        thread = threading.Thread(target=copy_late)
        thread.start()
        self.threads.append(thread)
        return target, thread.join

    def finish(self) -> None:  # the stream's end: every queued copy has run
        for thread in self.threads:
            thread.join()


def test_late_device_copies_never_see_a_refilled_buffer(checkpoint):
    copier = LateCopier()
    # depth 2: the reader must reuse each buffer many times within one tensor
    with TensorReader("cpu", copier=copier, depth=2, slice_bytes=SLICE_BYTES) as reader:
        for name in ("wide", "tall", "row_over_slice"):
            parts = [(start, part) for start, part in reader.slices(checkpoint, name)]
            assert len(parts) >= 4
            copier.finish()
            flat = torch.cat([part for _, part in parts])
            assert [start for start, _ in parts] == sorted(start for start, _ in parts)
            assert torch.equal(flat, expected(checkpoint, name).reshape(-1))


def test_a_copier_that_is_not_waited_for_is_caught(checkpoint):
    """The test above can fail: the same late copies with a wait that does not wait give
    wrong bytes."""

    class ImpatientCopier(LateCopier):
        def __call__(self, host):
            target, _ = super().__call__(host)
            return target, None

    copier = ImpatientCopier(delay=0.02)
    with TensorReader("cpu", copier=copier, depth=2, slice_bytes=SLICE_BYTES) as reader:
        parts = [part for _, part in reader.slices(checkpoint, "tall")]
        copier.finish()
    assert not torch.equal(torch.cat(parts), expected(checkpoint, "tall"))


def serial_read(checkpoint: Checkpoint, name: str, minus: torch.Tensor) -> torch.Tensor:
    return expected(checkpoint, name).to(minus.dtype) - minus


@pytest.mark.parametrize("depth, read_ahead", [(1, True), (2, True), (4, True), (4, False)])
def test_read_ahead_with_a_slow_consumer_equals_a_serial_read(checkpoint, depth, read_ahead):
    names = ["wide", "tall", "small", "row_over_slice", "scalar", "empty"]
    bases = {name: torch.randn(expected(checkpoint, name).shape, dtype=torch.float32)
             for name in names}
    with TensorReader("cpu", depth=depth, slice_bytes=SLICE_BYTES, read_ahead=read_ahead) as reader:
        for index, name in enumerate(names):
            after = (checkpoint, names[index + 1]) if index + 1 < len(names) else None
            streamed = torch.empty_like(bases[name]).reshape(-1)

            def slowly(start, part, streamed=streamed):
                time.sleep(0.0005)  # the method is slower than the reads
                streamed[start:start + part.numel()] = part

            reader.stream(checkpoint, name, bases[name], slowly, then=after)
            direct = torch.empty_like(bases[name])
            reader.read_into(direct, checkpoint, name, minus=bases[name])
            wanted = serial_read(checkpoint, name, bases[name])
            assert torch.equal(streamed.reshape(wanted.shape), wanted)
            assert torch.equal(direct, wanted)


def test_a_read_ahead_that_is_not_used_is_dropped(checkpoint):
    with TensorReader("cpu", depth=2, slice_bytes=SLICE_BYTES, read_ahead=True) as reader:
        reader.read_ahead(checkpoint, "tall")  # announced, then not what is asked for
        reader.read_ahead(checkpoint, "wide")
        target = torch.empty(3, 5)
        reader.read_into(target, checkpoint, "small")
        assert torch.equal(target, expected(checkpoint, "small"))
        target = torch.empty(40_000)
        reader.read_into(target, checkpoint, "tall")  # its buffers all came back
        assert torch.equal(target, expected(checkpoint, "tall"))


def test_a_consumer_that_stops_early_gives_its_buffers_back(checkpoint):
    with TensorReader("cpu", depth=2, slice_bytes=SLICE_BYTES, read_ahead=True) as reader:
        for _ in range(3):
            stream = reader.slices(checkpoint, "tall", then=(checkpoint, "wide"))
            next(stream)
            stream.close()
        target = torch.empty(37, 1001)
        reader.read_into(target, checkpoint, "wide")
        assert torch.equal(target, expected(checkpoint, "wide").float())


@pytest.mark.parametrize("read_ahead", [True, False])
def test_a_file_cut_short_is_one_source_error(checkpoint, tmp_path, read_ahead):
    import shutil

    shutil.copytree(checkpoint.directory, tmp_path / "cut")
    truncated = Checkpoint.open("cut", tmp_path / "cut")
    path = truncated.tensors["tall"].file
    with open(path, "r+b") as handle:
        handle.truncate(truncated.tensors["tall"].offset + 1000)
    with TensorReader("cpu", depth=2, slice_bytes=SLICE_BYTES, read_ahead=read_ahead) as reader:
        with pytest.raises(SourceError, match="cannot read tensor tall.*end of file"):
            reader.read_into(torch.empty(40_000), truncated, "tall")
        target = torch.empty(3, 5)  # the reader goes on serving other reads
        reader.read_into(target, checkpoint, "small")
        assert torch.equal(target, expected(checkpoint, "small"))


def three_sources(directory, poisoned: bool = False) -> list[Checkpoint]:
    """One tensor in three dtypes (the float64 one subtracts before rounding); rows of 1001."""
    generator = torch.Generator().manual_seed(1)
    checkpoints = []
    for index, dtype in enumerate((torch.bfloat16, torch.float16, torch.float64)):
        weights = torch.randn(300, 1001, generator=generator).to(dtype)
        if poisoned and index == 1:
            weights[250, 7] = float("inf")  # in a late slice: every source is read before it
        folder = directory / f"ft-{index}"
        folder.mkdir()
        save_file({"w": weights}, folder / "model.safetensors")
        checkpoints.append(Checkpoint.open(f"ft-{index}", folder))
    return checkpoints


def test_slice_major_reading_equals_reading_source_by_source(tmp_path, monkeypatch):
    monkeypatch.setattr("raymerge.reading.ACROSS_SLICE_BYTES", 3 * 1001 * 4)  # 100 slices
    sources = three_sources(tmp_path)
    base = torch.randn(300, 1001, generator=torch.Generator().manual_seed(2))
    weights = [0.3, -1.7, 0.9]
    by_source, across = torch.zeros(300 * 1001), torch.zeros(300 * 1001)
    order = []

    def add(index, start, part):
        order.append((start, index))
        across[start:start + part.numel()].add_(part, alpha=weights[index])

    with TensorReader("cpu") as reader:
        assert reader.streams_across(sources)
        for index, source in enumerate(sources):
            reader.stream(source, "w", base, lambda start, part, index=index: by_source[
                start:start + part.numel()].add_(part, alpha=weights[index]))
        reader.stream_across(sources, "w", base, add)
    assert torch.equal(across, by_source)
    assert len(order) == 300 and order[:4] == [(0, 0), (0, 1), (0, 2), (3003, 0)]


def test_slice_major_reading_names_the_source_that_is_not_finite(tmp_path):
    sources = three_sources(tmp_path, poisoned=True)
    with TensorReader("cpu") as reader:
        with pytest.raises(SourceError, match="source ft-1: tensor w contains NaN or Inf"):
            reader.stream_across(sources, "w", torch.zeros(300, 1001), lambda *_: None)


def test_slice_major_reading_is_for_inline_local_reads(tmp_path, checkpoint):
    with TensorReader("cpu", read_ahead=True) as reader:
        assert not reader.streams_across([checkpoint])
    with TensorReader("cpu", copier=LateCopier()) as reader:
        assert not reader.streams_across([checkpoint])


def test_slice_major_reading_of_a_file_cut_short_is_one_source_error(tmp_path):
    sources = three_sources(tmp_path)
    with open(sources[2].tensors["w"].file, "r+b") as handle:
        handle.truncate(sources[2].tensors["w"].offset + 1000)
    with TensorReader("cpu") as reader:
        with pytest.raises(SourceError, match="source ft-2: cannot read tensor w.*end of file"):
            reader.stream_across(sources, "w", torch.zeros(300, 1001), lambda *_: None)
