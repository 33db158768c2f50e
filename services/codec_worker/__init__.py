"""The SNAC codec worker.

MKL fixes its numeric mode at its first call, and the decoder's bits depend on it
(numeric_mode.py), so the mode is asked for here, before anything in the package
can start torch.
"""

from services.codec_worker.numeric_mode import request_before_torch

request_before_torch()
