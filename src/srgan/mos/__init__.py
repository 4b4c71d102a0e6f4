"""Mean opinion score (MOS): a blind rating study of super-resolved images.

PSNR/SSIM reward blur; SRGAN is meant to look real, which only people can judge. This package
follows Ledig et al. (2017, sec. 3.4): raters score each image from 1 (bad) to 5 (excellent),
without knowing which method produced it, and nearest neighbour, bicubic and the original HR
images are mixed in as calibration anchors.

- scale.py    the 1..5 scale and its labels (defined once)
- study.py    build a study: uncompressed stimuli PNGs with opaque names + study.json (the secret key)
- db.py       sqlite (WAL) store of raters (secret tokens, hashed) and ratings, UNIQUE(rater, stimulus)
- app.py      the Flask rating app: a blueprint of views, CSRF/Origin checks, next-stimulus-only ratings
- stats.py    MOS, t-based 95% CIs, paired Wilcoxon signed-rank tests with Holm correction
- results.py  reports/mos.{json,md,png} and MOS metrics on the models' MLflow runs
"""
