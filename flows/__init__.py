"""Prefect flows (composition only) and the ``gram`` command.

``flows.pipeline``: ``gram_pipeline`` and one flow per stage; ``flows.adapt``: fine-tune a registered judge
on a few labels; ``flows.cli``: the ``gram`` console command. Deployments: ``prefect.yaml``.
"""
