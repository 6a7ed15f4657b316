"""The mechanics of transfer: restore chosen layers, freeze and unfreeze, fine-tune, and
pretrain an encoder without labels (a convolutional autoencoder) when no pretrained
network fits. Results join the linear probes in ``results/<dataset>/results.csv``."""
