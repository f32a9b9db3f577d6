import numpy as np
import pytest
from safetensors.numpy import load_file

from t2i.interop import tensorfile


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


def test_cast_on_write_and_reading_a_file_safetensors_wrote(tmp_path):
    import mindspore as ms
    from safetensors.numpy import save_file

    rng = np.random.default_rng(1)
    arrays = {"w": rng.standard_normal((4, 6)).astype(np.float32), "step": np.array([3], np.int64)}
    tensorfile.save(arrays, tmp_path / "half.safetensors", dtype=np.float16)
    back = load_file(str(tmp_path / "half.safetensors"))
    assert back["w"].dtype == np.float16 and back["step"].dtype == np.int64  # only floating tensors are cast
    np.testing.assert_array_equal(back["w"], arrays["w"].astype(np.float16))
    # A file from safetensors' own writer (its own tensor order and padding) loads too.
    save_file({"b": arrays["w"][:2], "a": arrays["w"]}, str(tmp_path / "theirs.safetensors"))
    params = {k: ms.Parameter(ms.Tensor(np.zeros(v.shape, np.float32)), name=k)
              for k, v in (("a", arrays["w"]), ("b", arrays["w"][:2]))}
    tensorfile.load_into(params, tmp_path / "theirs.safetensors", "test")
    np.testing.assert_array_equal(params["a"].asnumpy(), arrays["w"])
    np.testing.assert_array_equal(params["b"].asnumpy(), arrays["w"][:2])
