"""ref-tuning: fine-tune Sheared-LLaMA-2.7B on CodeContests as the reference model for Rho-1."""
