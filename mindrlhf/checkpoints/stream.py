"""A MindSpore checkpoint written tensor by tensor, so that a 7B model never sits in memory whole.

Each tensor (cut into slices of at most SLICE_BYTES) is one Checkpoint protobuf message appended to the file, as
mindspore.save_checkpoint writes them. The writer only writes: the caller writes to a temporary name and renames
it when complete (mindrlhf.io.replaced_whole).
"""
import numpy as np


class CheckpointStreamWriter:
    """Appends one MindSpore Checkpoint protobuf message per tensor slice to `path`; a context manager that
    closes the file."""

    SLICE_BYTES = 1 << 30

    def __init__(self, path: str):
        from mindspore.train.checkpoint_pb2 import Checkpoint

        self.Checkpoint = Checkpoint  # pylint: disable=invalid-name
        self.fh = open(path, "wb")  # pylint: disable=consider-using-with

    def write(self, name: str, array: np.ndarray, ms_type: str):
        slices = max(1, int(np.ceil(array.nbytes / self.SLICE_BYTES)))
        flat = array.reshape(array.shape[0], -1) if array.ndim else array.reshape(1)
        for part in np.array_split(flat, slices) if slices > 1 else [array]:
            message = self.Checkpoint()
            value = message.value.add()
            value.tag = name
            value.tensor.dims.extend(list(array.shape))
            value.tensor.tensor_type = ms_type
            value.tensor.tensor_content = np.ascontiguousarray(part).tobytes()
            self.fh.write(message.SerializeToString())

    def close(self):
        self.fh.close()

    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc, tb):
        self.close()
        return False
