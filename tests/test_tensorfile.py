import numpy as np
import pytest
from safetensors.numpy import load_file

from t2i import tensorfile


def test_written_file_reads_back_in_safetensors_own_reader(tmp_path):
    import mindspore as ms

    rng = np.random.default_rng(0)
    arrays = {"w": rng.standard_normal((3, 5, 7)).astype(np.float32), "h": rng.standard_normal(9).astype(np.float16),
              "step": np.array(7, np.int32), "flags": np.array([True, False, True]), "odd": np.arange(3, dtype=np.int8)}
    values = {k: ms.Parameter(ms.Tensor(v), name=k) if k in ("w", "step") else v for k, v in arrays.items()}
    tensorfile.save(values, tmp_path / "x.safetensors", metadata={"format": "pt"})
    back = load_file(str(tmp_path / "x.safetensors"))
    assert set(back) == set(arrays)
    for k, v in arrays.items():
        assert back[k].dtype == v.dtype and back[k].shape == v.shape
        np.testing.assert_array_equal(back[k], v, err_msg=k)


def test_load_into_sets_parameters_and_refuses_other_names(tmp_path):
    import mindspore as ms

    saved = {"a": np.full((2, 3), 1.5, np.float32), "b": np.arange(4, dtype=np.float32)}
    tensorfile.save(saved, tmp_path / "s.safetensors")
    params = {k: ms.Parameter(ms.Tensor(np.zeros_like(v)), name=k) for k, v in saved.items()}
    tensorfile.load_into(params, tmp_path / "s.safetensors", "--resume_from_checkpoint c")
    for k, v in saved.items():
        np.testing.assert_array_equal(params[k].asnumpy(), v)
    params["c"] = ms.Parameter(ms.Tensor(np.zeros(1, np.float32)), name="c")
    with pytest.raises(ValueError, match=r"--resume_from_checkpoint c: .*missing \['c'\]"):
        tensorfile.load_into(params, tmp_path / "s.safetensors", "--resume_from_checkpoint c")
