"""Offline tools the training and evaluation path never imports: the concept-vocabulary builder."""
