"""Classification mode (`clipkd cls`): CNN teacher/student distillers (KD, DKD, ReviewKD and their "++" variants with
the dino-loss), its typed config, image-folder and CIFAR data, the teacher's class means (`centers`), the SGD loop on
engine/ and `clipkd demo --cls`."""
