"""Tools built on the engine (`trimkit`'s core: state, ops, sites, rewrite, hooks): the
benchmark, the command line, saving and loading, training and its objectives, ONNX export
and the pictures. Nothing in the core imports them."""
