"""Hugging Face transformers (torch, OpenVINO): options, loading, generation."""
