"""The GPTQ core: exact on a diagonal Hessian, better than round-to-nearest on correlated inputs."""

import pytest
import torch

from workflow_scripts.checkpoint.vacc_files.quantization_vacc import per_channel_scale, quantize_per_channel
from workflow_scripts.quantization.gptq import (
    Hessian,
    gptq_quantize,
    inverse_factor,
    output_error,
    round_block_reference,
)


def correlated_inputs(rows, columns, seed=0):
    generator = torch.Generator().manual_seed(seed)
    mixing = torch.randn(columns, columns, generator=generator) / columns**0.5
    return torch.randn(rows, columns, generator=generator) @ mixing + 0.1 * torch.randn(
        rows, columns, generator=generator
    )


def test_hessian_is_the_running_mean_of_2_x_xt():
    inputs = correlated_inputs(96, 16)
    hessian = Hessian(16)
    for part in inputs.split([10, 50, 36]):
        hessian.add(part.reshape(2, -1, 16))
    assert hessian.rows == 96
    assert torch.allclose(hessian.matrix, 2 * inputs.double().T @ inputs.double() / 96, atol=1e-10)


def test_diagonal_hessian_gives_exactly_round_to_nearest():
    weight = (0.02 * torch.randn(48, 64, generator=torch.Generator().manual_seed(1))).to(torch.bfloat16)
    diagonal = torch.diag(torch.rand(64, generator=torch.Generator().manual_seed(2)) + 0.5)
    q, scale = gptq_quantize(weight, diagonal, block_size=16)
    expected_q, expected_scale = quantize_per_channel(weight)
    assert torch.equal(q, expected_q) and torch.equal(scale, expected_scale)


def test_gptq_beats_round_to_nearest_on_correlated_inputs():
    weight = (0.02 * torch.randn(64, 128, generator=torch.Generator().manual_seed(3))).to(torch.bfloat16)
    hessian = Hessian(128)
    hessian.add(correlated_inputs(1024, 128))
    rtn = quantize_per_channel(weight)
    for act_order in (False, True):
        q, scale = gptq_quantize(weight, hessian.matrix, block_size=32, act_order=act_order)
        assert torch.equal(scale, rtn[1])
        assert q.dtype == torch.int8 and q.abs().max() <= 127
        assert output_error(weight, q, scale, hessian.matrix) < 0.8 * output_error(weight, *rtn, hessian.matrix)


def test_dead_inputs_get_zero_weights_and_no_nan():
    weight = torch.randn(8, 16)
    hessian = Hessian(16)
    inputs = correlated_inputs(64, 16)
    inputs[:, 3] = 0
    hessian.add(inputs)
    q, scale = gptq_quantize(weight, hessian.matrix, block_size=8)
    assert (q[:, 3] == 0).all() and torch.isfinite(scale).all()


def test_stacked_projections_round_as_if_alone():
    hessian = Hessian(64)
    hessian.add(correlated_inputs(512, 64))
    parts = [
        (0.02 * torch.randn(rows, 64, generator=torch.Generator().manual_seed(rows))).to(torch.bfloat16)
        for rows in (32, 8, 8)
    ]
    q, scale = gptq_quantize(torch.cat(parts), hessian.matrix, block_size=16)
    alone = [gptq_quantize(part, hessian.matrix, block_size=16) for part in parts]
    assert torch.equal(scale, torch.cat([s for _, s in alone]))
    # the trailing update is one product over all rows, so a rare rounding tie may differ
    assert (q == torch.cat([a for a, _ in alone])).float().mean() > 0.999


FUSED_CHECK = """
import torch
from workflow_scripts.checkpoint.vacc_files.quantization_vacc import per_channel_scale
from workflow_scripts.quantization.gptq import Hessian, inverse_factor, round_block_reference
from workflow_scripts.quantization.gptq_kernels import round_block_fused

generator = torch.Generator().manual_seed(0)
for rows, width in ((37, 40), (5, 160)):
    x = torch.randn(4 * width, width, generator=generator) @ torch.randn(width, width, generator=generator)
    hessian = Hessian(width)
    hessian.add(x)
    inverse = inverse_factor(hessian.matrix, 0.01, torch.arange(width))
    weight = 0.02 * torch.randn(rows, width, generator=generator)
    weight[0] = 0  # an all-zero row: divisor 1, no NaN
    _, divisor = per_channel_scale(weight, torch.bfloat16)
    expected = round_block_reference(weight.clone(), inverse, divisor, 127)
    fused = round_block_fused(weight.clone(), inverse, divisor, 127)
    same = (expected[0] == fused[0]).float().mean().item()
    spread = (expected[1] - fused[1]).abs().max().item() / expected[1].abs().max().item()
    print(rows, width, same, spread)
    assert same > 0.999 and spread < 1e-3 and torch.isfinite(fused[1]).all(), (same, spread)
"""


def test_fused_block_kernel_matches_the_reference_loop():
    """The Triton kernel, run by Triton's interpreter on the CPU: same rounding, same errors; a block wider
    than one program holds (160 > 128 columns) is split."""
    import os
    import subprocess
    import sys

    from conftest import REPO

    result = subprocess.run(
        [sys.executable, "-c", FUSED_CHECK],
        capture_output=True,
        text=True,
        cwd=REPO,
        env={**os.environ, "TRITON_INTERPRET": "1", "PYTHONPATH": str(REPO)},
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert len(result.stdout.splitlines()) == 2


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_on_a_gpu_the_fused_kernel_matches_the_reference_and_the_cpu_result():
    from workflow_scripts.quantization.gptq_kernels import round_block_fused

    hessian = Hessian(256)
    hessian.add(correlated_inputs(4096, 256))
    weight = (0.02 * torch.randn(300, 256, generator=torch.Generator().manual_seed(4))).to(torch.bfloat16)
    inverse = inverse_factor(hessian.matrix, 0.01, torch.arange(256)).cuda()
    _, divisor = per_channel_scale(weight.float(), torch.bfloat16)
    block = weight.float().cuda()[:, :128]
    expected = round_block_reference(block.clone(), inverse[:128, :128], divisor.cuda(), 127)
    fused = round_block_fused(block.clone(), inverse[:128, :128], divisor.cuda(), 127)
    assert (expected[0] == fused[0]).float().mean() > 0.999
    assert (expected[1] - fused[1]).abs().max() <= 1e-3 * expected[1].abs().max()
    on_cpu = output_error(weight, *gptq_quantize(weight, hessian.matrix), hessian.matrix)
    gpu_hessian = hessian.matrix.float().cuda()
    on_gpu = output_error(weight.cuda(), *gptq_quantize(weight.cuda(), gpu_hessian), gpu_hessian)
    assert abs(on_gpu - on_cpu) < 0.02 * on_cpu
