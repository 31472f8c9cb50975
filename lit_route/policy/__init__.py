"""Online RLHF: the RLOO policy LightningModule, sampling, log-probabilities and the policy loss."""
