"""The network: model, training and export."""
