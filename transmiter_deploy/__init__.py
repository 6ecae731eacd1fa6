"""transmiter-deploy: TransMiter adapters, from training to deployment.

The library is the product; the ``transmiter`` CLI is a thin layer over it.
Modules, one concept each (see docs/architecture.md):

- :mod:`~transmiter_deploy.adapter` the logit-space adapter and its artifact;
- :mod:`~transmiter_deploy.heads` zero-shot heads with auxiliary classes;
- :mod:`~transmiter_deploy.cache` cached image features, read by every phase;
- :mod:`~transmiter_deploy.extraction`, :mod:`~transmiter_deploy.transfer`,
  :mod:`~transmiter_deploy.plus` the three phases of the method;
- :mod:`~transmiter_deploy.evaluation` base-to-novel metrics.
"""

__version__ = "0.1.0"
