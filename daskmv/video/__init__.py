"""Video rows: a manifest row is a video file, and frames sampled from it are what the ops see.

- :mod:`~daskmv.video.decode`: probe a file (frame timestamps from its packets, without decoding), choose
  frames (:class:`~daskmv.video.decode.Sampling`: a rate, a stride, a time window, a cap) and decode just
  those, in chunks, with PyAV (FFmpeg) or OpenCV;
- :mod:`~daskmv.video.synthetic`: videos whose pixels encode their frame index, for tests, benchmarks and
  the demo.

Submodules are not imported here: PyAV is imported only by what decodes.
"""
