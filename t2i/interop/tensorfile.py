"""safetensors files written and read one tensor at a time.

safetensors' `save` builds the whole file as one `bytes` (SD-1.5's single-file export: +4.3 GB), and its `save_file`
in the 0.4 releases this project accepts turned every tensor into a `bytes` copy before writing (SD-1.5's AdamW
moments: 6.9 GB more RSS at every checkpoint, on top of the training state). Here each tensor is
written from a zero-copy NumPy view of it (`Tensor.asnumpy()` shares a CPU tensor's memory), and read back one at a
time. The files are plain safetensors: `safetensors.safe_open` and every other reader load them, and load_into reads
any safetensors file of the dtypes below.
"""

import json
import struct

import ml_dtypes
import numpy as np

_DTYPES = {np.dtype(t): code for t, code in ((np.float64, "F64"), (np.float32, "F32"), (np.float16, "F16"),
                                              (ml_dtypes.bfloat16, "BF16"), (np.int64, "I64"), (np.int32, "I32"),
                                              (np.int16, "I16"), (np.int8, "I8"), (np.uint8, "U8"), (np.bool_, "BOOL"))}


def _array(value) -> np.ndarray:
    return np.ascontiguousarray(value if isinstance(value, np.ndarray) else value.asnumpy())


def _meta(value) -> tuple:
    """(shape, NumPy dtype) without copying the data (a device tensor's asnumpy would)."""
    if isinstance(value, np.ndarray):
        return value.shape, value.dtype
    import mindspore as ms

    return tuple(value.shape), np.dtype(ms.dtype_to_nptype(value.dtype))


def save(tensors: dict, path, metadata: dict | None = None, dtype=None):
    """Write `tensors` (name -> MindSpore Tensor/Parameter or NumPy array) to `path` in safetensors format, converting
    and writing one tensor at a time; floating tensors are written cast to `dtype` if given."""
    header, offset, written = {}, 0, {}
    for name, value in tensors.items():
        shape, stored = _meta(value)
        written[name] = np.dtype(dtype) if dtype is not None and stored.kind == "f" else stored
        if written[name] not in _DTYPES:
            raise TypeError(f"{name}: dtype {written[name]} has no safetensors code here")
        nbytes = int(np.prod(shape, dtype=np.int64)) * written[name].itemsize
        header[name] = {"dtype": _DTYPES[written[name]], "shape": list(shape),
                        "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    if metadata:
        header["__metadata__"] = metadata
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)  # the format aligns the data to 8 bytes
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(blob)))
        f.write(blob)
        for name, value in tensors.items():
            f.write(_array(value).astype(written[name], copy=False).reshape(-1).view(np.uint8).data)


def _header(f) -> tuple:
    """(where the data starts, name -> {dtype, shape, data_offsets}) of an open safetensors file."""
    size = struct.unpack("<Q", f.read(8))[0]
    header = json.loads(f.read(size))
    header.pop("__metadata__", None)
    return 8 + size, header


def load_into(params: dict, path, where: str):
    """Set each Parameter in `params` (name -> Parameter) from the tensor of that name in the safetensors file `path`,
    one tensor in memory at a time. A name missing from either side is a one-line error naming `where`.

    Read with plain reads, not safetensors' memory map: every page of a mapped file that is read counts in the
    process's RSS until the file is closed (SD-1.5's 6.9 GB of AdamW moments took a resume's peak to 16.9 GB)."""
    import mindspore as ms

    codes = {code: dtype for dtype, code in _DTYPES.items()}
    with open(path, "rb") as f:
        start, header = _header(f)
        if set(header) != set(params):
            missing, unexpected = sorted(set(params) - set(header)), sorted(set(header) - set(params))
            raise ValueError(f"{where}: {path} does not match this run (missing {missing[:3]}, unexpected "
                             f"{unexpected[:3]}); resume with the flags it was saved with")
        for name, info in header.items():
            if info["dtype"] not in codes:
                raise ValueError(f"{where}: {path}: {name} is {info['dtype']}, which t2i does not read")
            dtype, (begin, end) = codes[info["dtype"]], info["data_offsets"]
            f.seek(start + begin)
            array = np.fromfile(f, dtype=dtype, count=(end - begin) // dtype.itemsize)
            params[name].set_data(ms.Tensor(array.reshape(info["shape"])))
