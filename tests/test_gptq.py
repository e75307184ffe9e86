"""The GPTQ core: exact on a diagonal Hessian, better than round-to-nearest on correlated inputs."""
import torch

from workflow_scripts.checkpoint_files.quantization_vacc import quantize_per_channel
from workflow_scripts.gptq import Hessian, gptq_quantize, output_error


def correlated_inputs(rows, columns, seed=0):
    generator = torch.Generator().manual_seed(seed)
    mixing = torch.randn(columns, columns, generator=generator) / columns ** 0.5
    return torch.randn(rows, columns, generator=generator) @ mixing + 0.1 * torch.randn(rows, columns,
                                                                                          generator=generator)


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
