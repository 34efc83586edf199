"""Task data: GLUE (hub or canonical TSVs), tweets, commonsense (LLM-Adapters format), VTAB-1k; one DataModule.

Import the submodules you need (``flexlora.data.datamodule`` pulls Lightning; the readers do not).
"""
