"""epmq: post-merge quantization of expert models (E-PMQ, GPTQ, RTN) and model merging."""

__version__ = "0.1.0"
