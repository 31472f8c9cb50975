"""Adapters to other trainers' reward interfaces, all on one routed pairwise reward (:mod:`.routed`).

- :mod:`.trl`: a reward function for TRL's ``GRPOTrainer`` / ``RLOOTrainer`` (``routed_reward(...)``);
- :mod:`.server`: ``lit-route serve``, OpenRLHF's remote reward-model protocol over HTTP;
- :mod:`.groups`, :mod:`.openrlhf`, :mod:`.collector`: finding the groups in a trainer's samples.

Nothing here drives Lightning's Trainer (the PM is a LightningModule used as a plain module); ``trl`` itself is
imported only by the user's own script.
"""
