"""Pydantic models of arpipe's contracts: pipeline spec, stage configs, outputs, store manifest.

Cheap to import: nothing here imports torch, ray or the rest of arpipe.
"""
