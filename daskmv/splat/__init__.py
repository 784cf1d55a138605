"""3D Gaussian splatting: a scene from posed photos as a cloud of anisotropic, view-dependently coloured Gaussians.

:mod:`~daskmv.splat.render` is a small pure-torch reference renderer (projection, spherical harmonics,
tiled front-to-back alpha compositing) that autograd differentiates, so training runs on any machine,
CPU-only CI included, without gsplat's CUDA kernels. It also holds the image metrics training reports
(SSIM, PSNR).
"""
