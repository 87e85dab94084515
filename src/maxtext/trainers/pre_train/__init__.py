"""The pretraining / finetuning entry point: `python3 -m maxtext.trainers.pre_train.train`."""
