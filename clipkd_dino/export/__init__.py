"""Export: a trained CLIP model for clients without this package, as an open_clip `local-dir:` folder
(`open_clip_folder`), ONNX towers for onnxruntime (`onnx_towers`) or a transformers CLIPModel folder (`hf_clip`);
`targets.export_targets` writes any of them from one checkpoint, `commands` is `clipkd export`. What they share
(staged output folders, the spread token table, preprocessing, the parity checks' inputs) is in `common`.

Nothing here is imported with the package: `clipkd --help` pulls in no torch.
"""
