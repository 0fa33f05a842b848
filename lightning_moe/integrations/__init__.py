"""Adapters for the MoE layers of other libraries (Hugging Face ``transformers``)."""
