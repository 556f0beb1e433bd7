"""Code generation: the kubelet API stubs (and, beside them, the manifests).

Run ``python -m codegen --help`` from the repository root.
"""
