import os
import shutil
import sys

import numpy as np
import pytest

import flatmap
import ridge

PACKAGE_DB = os.path.join(sys.prefix, "share", "pycortex", "db")  # pycortex's sample subject S1
N_S1 = 80615  # voxels in the thick mask of S1's transform "fullhead"


def snapshot(root):
    """{path: (size, mtime)} of every file under root."""
    return {os.path.join(d, f): (os.stat(os.path.join(d, f)).st_size,
                                 os.stat(os.path.join(d, f)).st_mtime_ns)
            for d, _, files in os.walk(root) for f in files}


@pytest.fixture(scope="module")
def s1(tmp_path_factory):
    """A copy of pycortex's S1 with the thick mask of 'fullhead' made in it (pycortex makes it on
    request), and that transform also as 'S1_auto', the dataset's naming; imported with its user
    config in a temp folder."""
    assert os.path.isdir(os.path.join(PACKAGE_DB, "S1")), "pycortex's sample database is missing"
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("XDG_CONFIG_HOME", str(tmp_path_factory.mktemp("config")))
        flatmap.import_cortex()  # pycortex writes options.cfg there if it is the first import
    db = str(tmp_path_factory.mktemp("pycortex") / "db")
    shutil.copytree(os.path.join(PACKAGE_DB, "S1"), os.path.join(db, "S1"))
    with flatmap.pycortex_db(db) as store:
        assert store.get_mask("S1", "fullhead", "thick").sum() == N_S1
    xfms = os.path.join(db, "S1", "transforms")
    shutil.copytree(os.path.join(xfms, "fullhead"), os.path.join(xfms, "S1_auto"))
    return db


def half_map():
    return {"baseline_r": np.r_[np.ones(N_S1 // 2), np.zeros(N_S1 - N_S1 // 2)],
            "refit_r": np.linspace(-0.2, 0.4, N_S1)}


def test_values_land_on_the_voxels_of_their_columns(s1):
    import cortex
    mask = flatmap.flatmap_mask(s1, "S1", "fullhead", N_S1)
    m = flatmap.flatmap_views(half_map(), "S1")[0]  # baseline: 1 on the first half of the columns
    by_hand = np.full(mask.shape, np.nan)  # (z, y, x): the hf5 columns are mask's voxels, C order
    by_hand[mask] = m.values
    with flatmap.pycortex_db(s1):
        vol = flatmap.flatmap_volume(m, "S1", "fullhead", mask)
        img, _ = cortex.quickflat.make_flatmap_image(vol, height=256, pixelwise=False)
        ref, _ = cortex.quickflat.make_flatmap_image(cortex.Volume(by_hand, "S1", "fullhead"),
                                                     height=256, pixelwise=False)
    seen = img[np.isfinite(img)]
    assert set(np.unique(seen)) == {0.0, 1.0}
    assert 0.05 < (seen == 1).mean() < 0.95  # two regions
    np.testing.assert_array_equal(img, ref)


def test_pngs_titled_and_nothing_written_outside_the_run_and_the_db_cache(s1, tmp_path,
                                                                         monkeypatch):
    import cortex
    from PIL import Image
    run, here = tmp_path / "run", tmp_path / "cwd"
    run.mkdir()
    here.mkdir()
    monkeypatch.chdir(here)
    package, db_before, store = snapshot(PACKAGE_DB), snapshot(s1), cortex.db.filestore
    r = half_map()
    fdr = ridge.fdr(np.linspace(0, 1, N_S1) ** 4, 0.05)
    paths = flatmap.draw_flatmaps(r, "S1", str(run), db=s1, fdr_mask=fdr, height=256,
                                  pixelwise=False)  # S1_auto: a new cache (its pixel map)
    paths += flatmap.draw_flatmaps(r, "S1", str(run), db=s1, transform="fullhead", tag="_S1",
                                   height=256, pixelwise=False)
    names = ["flatmap_baseline", "flatmap_refit", "flatmap_change", "flatmap_change_fdr"]
    assert [os.path.basename(p) for p in paths] == [n + ".png" for n in names] + \
        [n + "_S1.png" for n in names[:3]]
    titles = [Image.open(p).text["Title"] for p in paths]
    assert all(t.startswith("S1: ") for t in titles) and len(set(titles)) == 4
    assert Image.open(paths[0]).size[1] >= 256
    assert sorted(os.listdir(run)) == sorted(os.path.basename(p) for p in paths)
    assert snapshot(PACKAGE_DB) == package and os.listdir(here) == []
    changed = {p for p, v in snapshot(s1).items() if db_before.get(p) != v}
    assert os.path.join(s1, "S1", "cache", "S1_auto_pointnn.npz") in changed
    assert all(os.path.dirname(p) == os.path.join(s1, "S1", "cache") for p in changed)
    assert cortex.db.filestore == store  # pycortex's own database again


def test_the_fdr_map_keeps_only_the_passing_voxels():
    r, keep = half_map(), np.arange(N_S1) % 3 == 0
    maps = flatmap.flatmap_views(r, "S1", fdr_mask=keep)
    change = r["refit_r"] - r["baseline_r"]
    np.testing.assert_array_equal(maps[2].values, change)
    np.testing.assert_array_equal(maps[3].values[keep], change[keep])
    assert np.isnan(maps[3].values[~keep]).all()
    assert maps[2].vmin == -maps[2].vmax and maps[0].vmin == 0 and maps[0].vmax == maps[1].vmax


def test_a_run_folder_gets_its_subjects_maps(s1, tmp_path):
    root, run = tmp_path / "ds", tmp_path / "run"
    shutil.copytree(s1, root / "derivative" / "pycortex-db")
    run.mkdir()
    r = half_map()
    p = np.linspace(0, 1, N_S1) ** 4
    np.savez(run / "voxel_r.npz", **r, baseline_p=p, refit_p=p)
    maps, db = flatmap.check_flatmaps(str(run), str(root), ["S1"])
    assert db == str(root / "derivative" / "pycortex-db")
    np.testing.assert_array_equal(maps["S1"]["fdr"], ridge.fdr(p, 0.05))
    paths = flatmap.run_flatmaps(str(run), str(root), ["S1"], height=256, pixelwise=False)
    assert [os.path.basename(x) for x in paths][-1] == "flatmap_change_fdr.png"
    assert all(os.path.dirname(x) == str(run) for x in paths)


def test_subject_maps_split_a_multi_subject_run(tmp_path):
    np.savez(tmp_path / "v.npz", **{"UTS01.refit_r": np.ones(3), "UTS02.refit_r": np.zeros(4)})
    out = flatmap.subject_maps(np.load(tmp_path / "v.npz"), ["UTS01", "UTS02"])
    assert list(out["UTS01"]["refit_r"]) == [1, 1, 1] and len(out["UTS02"]["refit_r"]) == 4


def test_refusals_name_the_database_subject_and_counts(s1, tmp_path):
    np.savez(tmp_path / "voxel_r.npz", **half_map())
    with pytest.raises(ValueError, match="no pycortex database.*pycortex-db/S01"):
        flatmap.check_flatmaps(str(tmp_path), str(tmp_path / "synthetic"), ["S01"])
    with pytest.raises(ValueError, match="no subject UTS01; present: S1"):
        flatmap.draw_flatmaps(half_map(), "UTS01", str(tmp_path), db=s1)
    with pytest.raises(ValueError, match=f"{N_S1} voxels in S1's thick mask, but the run has 100"):
        flatmap.draw_flatmaps({"baseline_r": np.zeros(100), "refit_r": np.zeros(100)}, "S1",
                              str(tmp_path), db=s1, transform="fullhead")
    with pytest.raises(ValueError, match="retinotopy/mask_thick.nii.gz: no such file"):
        flatmap.flatmap_mask(s1, "S1", "retinotopy", N_S1)
    assert "mask_thick.nii.gz" not in os.listdir(os.path.join(s1, "S1", "transforms", "retinotopy"))
    np.savez(tmp_path / "voxel_r.npz", baseline_r=np.zeros(3))
    with pytest.raises(ValueError, match="stage-1 run"):
        flatmap.check_flatmaps(str(tmp_path), str(tmp_path), ["S1"], db=s1)
    assert not [f for f in os.listdir(tmp_path) if f.endswith(".png")]


def test_without_pycortex_it_says_how_to_install_it(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "cortex", None)
    with pytest.raises(ValueError, match="--flatmap needs pycortex: pip install pycortex"):
        flatmap.draw_flatmaps(half_map(), "S1", str(tmp_path), db=str(tmp_path))


def test_an_unwritable_cache_and_an_unfetched_mask_are_refused(s1, tmp_path):
    db = tmp_path / "db"
    shutil.copytree(os.path.join(s1, "S1"), db / "S1", ignore=shutil.ignore_patterns("cache"))
    (db / "S1" / "cache").write_text("")  # not a folder: refused as a read-only one would be
    with pytest.raises(ValueError, match="S1/cache: pycortex keeps its flatmap pixel maps there"):
        flatmap.flatmap_mask(str(db), "S1", "fullhead", N_S1)
    link = db / "S1" / "transforms" / "retinotopy" / "mask_thick.nii.gz"
    link.symlink_to(tmp_path / ".git" / "annex" / "objects" / "absent")
    with pytest.raises(ValueError, match="mask_thick.nii.gz: not fetched yet"):
        flatmap.flatmap_mask(str(db), "S1", "retinotopy", N_S1)
