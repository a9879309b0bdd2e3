"""The tutorial's `python hccl_tools.py --device_num "[0,8)"` (the code lives in mindrlhf/tools/hccl_tools.py).

Making a rank table imports neither MindSpore nor MindFormers (`import mindrlhf` is light).
"""
import os
import sys

sys.path.insert(0, os.path.abspath(os.path.join(os.path.dirname(__file__), "..")))

from mindrlhf.tools import hccl_tools  # noqa: E402

if __name__ == "__main__":
    sys.exit(hccl_tools.main())
