"""Reading training data, for every command: image-caption CSVs (`csv_table`, the one CSV reader) and webdataset
shards (`tars`, the one tar reader), drawn as training pairs (`pairs`) or visited sample by sample (`samples`),
with sample identities across sources (`identity`), replayable augmentation views (`views`), the one DataLoader
factory (`loader`), and bad-sample accounting with the one caption decoding policy (`faults`). Of the package
it imports only errors, files and runtime."""
