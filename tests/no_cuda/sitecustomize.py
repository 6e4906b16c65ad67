"""Imported at the start of every Python process a test starts (tests/conftest.py's python_env
puts this folder first on PYTHONPATH): no CUDA device is visible, so the test takes the CPU path
on a GPU machine too.

Setting it here, not only in the environment: DeepSpeed's launcher sets CUDA_VISIBLE_DEVICES=0,1,...
for each rank it starts, also when its CPU accelerator runs them, and the ranks would find the GPU.
"""

import os

os.environ["CUDA_VISIBLE_DEVICES"] = ""
