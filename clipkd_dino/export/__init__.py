"""Export: a trained CLIP model for clients without this package, as an open_clip `local-dir:` folder (`common`),
ONNX towers for onnxruntime (`onnx_towers`) or a transformers CLIPModel folder (`hf_clip`); `commands` is
`clipkd export`.

Nothing here is imported with the package: `clipkd --help` pulls in no torch.
"""
