"""ironpod: training foundation models on clusters that fail.

The top-level package imports nothing heavy: ``import ironpod`` must stay cheap and must work
without torch's optional parts, NVML, kubernetes or boto3 installed (DESIGN.md, STYLE.md lesson 9).
"""

__version__ = "0.1.0"
