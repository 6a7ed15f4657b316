"""The built-in baselines, one ``@register`` entry each (see ``baselines.registry``)."""

from __future__ import annotations

from dataclasses import replace

from baselines.registry import DENSE_GRID, register


def _spec(kind: str, options):
    spec = options.settings[kind]
    if options.dense is True and not spec.dense:
        spec = replace(spec, dense=True, **DENSE_GRID)
    elif options.dense is False and spec.dense:
        spec = replace(spec, dense=False)
    return spec


def _local(name: str, kind: str, encoding: str, key: str, dataset, options):
    from baselines.local import LocalFeaturizer, codebook_split

    spec = _spec(kind, options)
    params = dict(options.settings[key])
    if options.words is not None:
        params["words"] = options.words
    suffix = ("_dense" if spec.dense and not options.settings[kind].dense else "") + ("" if options.preset == "paper" else f"_{options.preset}")
    return LocalFeaturizer(name + suffix, spec, encoding, preset=options.preset, seed=options.seed,
                           split=codebook_split(dataset, options.codebook_split), words_given=options.words is not None, **params)


@register("hog", what="scikit-image HOG, 9 orientations, 2x2-cell blocks, L2-Hys", source="Dalal & Triggs, CVPR 2005")
def _hog(dataset, options):
    from baselines.hog import HOGFeaturizer

    return HOGFeaturizer.for_dataset(dataset)


@register("surf_bow", what="SURF (mahotas) at detected keypoints, bag of visual words", uses="surf",
          source="Saenko et al., ECCV 2010 (800-word SURF codebook from amazon), as DeCAF used it",
          reproduces="Office amazon->webcam SURF LogReg / SVM 9.63 / 11.05 (Donahue et al. 2014)")
def _surf_bow(dataset, options):
    return _local("surf_bow", "surf", "bow", "surf_bow", dataset, options)


@register("sift_bow", what="dense multi-scale SIFT, bag of words, 3-level spatial pyramid, chi2 kernel map", uses="sift",
          source="Lazebnik et al., CVPR 2006; PHOW descriptors (Bosch et al. 2007); chi2 map (Vedaldi & Zisserman 2012)",
          reproduces="Caltech-101 30 train 64.6%, 15-Scene 81.4% (Lazebnik et al. 2006)")
def _sift_bow(dataset, options):
    return _local("sift_bow", "sift", "bow", "sift_bow", dataset, options)


@register("vlad", store="sift_vlad", what="dense multi-scale RootSIFT, VLAD, intra-normalised", uses="sift",
          source="Jegou et al., CVPR 2010; Arandjelovic & Zisserman, CVPR 2013 (intra-normalisation)",
          reproduces="none on these datasets (retrieval papers)")
def _vlad(dataset, options):
    return _local("sift_vlad", "sift", "vlad", "vlad", dataset, options)


@register("fisher", store="sift_fisher", what="dense multi-scale SIFT, PCA-80, 256-mode improved Fisher vectors", uses="sift",
          source="Perronnin et al., ECCV 2010; Chatfield et al., BMVC 2011",
          reproduces="Caltech-101 30 train 77.8% (Chatfield et al. 2011)")
def _fisher(dataset, options):
    return _local("sift_fisher", "sift", "fisher", "fisher", dataset, options)


@register("color", what="HSV histogram, 16x4x4 bins", source="Swain & Ballard, IJCV 1991 (colour indexing)")
def _color(dataset, options):
    from baselines.simple import ColorHistogram

    return ColorHistogram(resize=dataset.resize)


@register("raw", what="32x32 grayscale thumbnail", source="-")
def _raw(dataset, options):
    from baselines.simple import RawPixels

    return RawPixels(resize=dataset.resize)  # 32 px from the settings, never from an image (upsampled where smaller)
