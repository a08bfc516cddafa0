"""ceriakeras: 3D structure of CeO2 nanoparticles from one low-dose HRTEM image.

Stages, each a module, following the data: structures → simulate → records → pipeline → model →
train → export → columns → analyze (and evaluate). Settings for each stage are in ``config``.
"""

__version__ = "0.1.0"
