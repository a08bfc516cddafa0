"""ceriakeras: 3D structure of CeO2 nanoparticles from one low-dose HRTEM image.

Folders follow the data (docs/architecture.md): ``physics`` (particles, simulated images) →
``data`` (TFRecords, tf.data) → ``nn`` (model, training, export) → ``inference`` (served model,
frame → columns) → ``analysis`` (series → tables, pictures) → ``evaluation`` (scores,
calibration), with ``cli`` on top. ``config`` and ``io`` are shared by all.
"""

__version__ = "0.1.0"
