"""Exports of trained models, each verified against the model with the tool users load
it with: merged HF dirs, PEFT adapters, HF sequence classifiers."""
