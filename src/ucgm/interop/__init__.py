"""Interoperability with other libraries. Each module imports its library (e.g. diffusers) when it is imported.

* :mod:`ucgm.interop.diffusers_transports`: ucgm transports of diffusers noise schedules (flow matching, discrete VP).
* :mod:`ucgm.interop.diffusers_scheduler`: :class:`UCGMScheduler`, UCGM-S as a diffusers scheduler.
* :mod:`ucgm.interop.diffusers_models`: :func:`sample_diffusers_model`, UCGM-S on diffusers models saved locally.
"""
