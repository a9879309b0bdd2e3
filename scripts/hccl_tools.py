"""The tutorial's `python hccl_tools.py --device_num "[0,8)"` (the code lives in mindrlhf/tools/hccl_tools.py).

Loaded by path, so making a rank table does not import MindSpore.
"""
import importlib.util
import os
import sys

_PATH = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "mindrlhf", "tools", "hccl_tools.py")
_spec = importlib.util.spec_from_file_location("mindrlhf_hccl_tools", _PATH)
hccl_tools = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(hccl_tools)

if __name__ == "__main__":
    sys.exit(hccl_tools.main())
