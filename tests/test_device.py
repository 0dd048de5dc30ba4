"""`--device` names checked before any model work: a clear error, not a torch traceback from `model.to`."""

import pytest
import torch

from flamingo.runtime.device import check_device


def test_a_usable_device_is_returned():
    assert check_device("cpu") == torch.device("cpu")


def test_an_unknown_device_name_is_refused_clearly():
    with pytest.raises(ValueError, match="--device 'gpu': not a device torch knows"):
        check_device("gpu")


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_cuda_without_cuda_is_refused_clearly():
    with pytest.raises(ValueError, match="use --device cpu"):
        check_device("cuda")
    with pytest.raises(ValueError, match="use --device cpu"):
        check_device("cuda:1")


@pytest.mark.parametrize("name", ["meta", "xla", "hpu"])
def test_meta_and_device_types_this_torch_cannot_use_are_refused_clearly(name):
    """They passed, and the command failed after the model loaded (`Tensor.item()` on meta, no xla/hpu backend)."""
    with pytest.raises(ValueError, match=f"--device '{name}': "):
        check_device(name)
