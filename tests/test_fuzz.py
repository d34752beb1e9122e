"""Fuzzing (issue #16, part 3): mutated small inputs (tests/fuzzing.py: the inputs, the seeded
mutator, the judge) through the calls the CLI makes per input, `pipeline.stylize_video` and
`stills.stylize_still`, with the tiny stack at --size 64.

A case passes only if, within 10 s, it either succeeds with an output that decodes or raises a
`StylizeError` with a one-line message; and if the process's peak resident memory during it stays
under 2 GiB, the input's bytes are unchanged, nothing is left beside the output and no thread of
ours still runs. `scripts/fuzz.py` runs the same cases for longer; the regressions it and this test
found are in test_video.py (damaged inputs)."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.fuzzing import BATCH_SIZE, FRAMES, Case, clean, file_format, kinds_for, make_case, run_case, seed_inputs

CI_CASES = 240  # each of the 60 (input, mutation kind) pairs four times
SEED = 0
pytestmark = [  # damaged EXIF blocks and huge headers are what these cases are made of
    pytest.mark.filterwarnings("ignore::UserWarning:PIL.TiffImagePlugin"),
    pytest.mark.filterwarnings("ignore::PIL.Image.DecompressionBombWarning"),
]


@pytest.fixture(scope="module")
def fuzz_setup(tiny_stack, tmp_path_factory):
    """(the inputs' files, the stylizer the CLI builds on the CPU at --size 64, its output options,
    an empty working folder)."""
    import torch

    from stylize.config import EngineConfig, OutputConfig, PipelineConfig, style_config
    from stylize.pipeline import build_stylizer

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny batches: a second thread on two shared cores waits more than it helps
    cfg = PipelineConfig(prompt=style_config("oil").prompt, size=64, batch_size=BATCH_SIZE)
    stylizer = build_stylizer(tiny_stack, cfg, EngineConfig())
    inputs = seed_inputs(tmp_path_factory.mktemp("fuzz-inputs"))
    yield inputs, stylizer, OutputConfig(preset="ultrafast"), tmp_path_factory.mktemp("fuzz")
    stylizer.close()
    torch.set_num_threads(threads)


def test_inputs_pass_unchanged(fuzz_setup):
    inputs, stylizer, out_cfg, work = fuzz_setup
    for name, files in inputs.items():
        outcome = run_case(Case(-1, name, "none", "", files), work, stylizer, out_cfg)
        assert (outcome.status, outcome.detail) == ("ok", f"{1 if name.endswith('.png') else FRAMES} frames"), name
        clean(work)


def test_mutator_is_seeded_and_covers_every_kind(fuzz_setup):
    inputs = fuzz_setup[0]
    cases = [make_case(inputs, SEED, i) for i in range(CI_CASES)]
    assert [c.files for c in cases[:40]] == [make_case(inputs, SEED, i).files for i in range(40)]
    assert all(c.files != inputs[c.name] for c in cases)
    kinds = {name: kinds_for(file_format(Path(min(files)).suffix)) for name, files in inputs.items()}
    assert {(c.name, c.kind) for c in cases} == {(name, kind) for name in inputs for kind in kinds[name]}


def test_fuzzed_inputs_end_in_an_output_or_a_stylize_error(fuzz_setup):
    """CI_CASES mutated inputs: each one passes (see tests/fuzzing.Outcome); failures are listed
    together, each with what `scripts/fuzz.py --seed 0 --first N --cases 1` needs to rerun it."""
    inputs, stylizer, out_cfg, work = fuzz_setup
    failures, counts = [], {}
    for index in range(CI_CASES):
        case = make_case(inputs, SEED, index)
        outcome = run_case(case, work, stylizer, out_cfg)
        counts[outcome.status] = counts.get(outcome.status, 0) + 1
        if not outcome.passed:
            failures.append(f"case {index} {case.name} {case.kind} ({case.what}): {outcome.status}: {outcome.detail}")
        clean(work)
    assert not failures, f"{len(failures)} of {CI_CASES} cases failed ({counts}):\n" + "\n".join(failures)
    assert counts.get("ok", 0) > CI_CASES // 5 and counts.get("error", 0) > CI_CASES // 5, counts
