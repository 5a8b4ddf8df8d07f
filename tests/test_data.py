"Data: the synthetic set, local files, the loaders, and clear errors on bad input."
import numpy as np, pytest, torch
from PIL import Image
from vqlearn.data import (get_dataset, make_shapes, load_npz, ArrayDataset, DeviceLoader, get_loader, split_dataset,
                          KaoKore, DATASETS, SHAPES)

def test_shapes_deterministic_and_sized():
    a, la = make_shapes(10, size=48, seed=5)
    b, lb = make_shapes(10, size=48, seed=5)
    assert a.shape == (10, 3, 48, 48) and a.dtype == torch.uint8 and torch.equal(a, b) and torch.equal(la, lb)
    ds = get_dataset('shapes', n=20, size=96)
    x, y = ds[3]
    assert x.shape == (3, 96, 96) and x.dtype == torch.float32 and 0 <= x.min() <= x.max() <= 1 and y.dtype == torch.int64

def test_shapes_are_learnable_but_not_trivial():
    "Classes differ on average (the shape is visible) but no single pixel statistic separates them."
    imgs, labels = make_shapes(1500, seed=0)
    x = imgs.float() / 255
    assert x.std(0).mean() > 0.15                        # the images vary
    assert (x.flatten(1).std(1) > 0.05).float().mean() > 0.95   # hardly any flat image

def test_unknown_dataset_lists_choices():
    with pytest.raises(ValueError) as e: get_dataset('imagenet')
    assert all(n in str(e.value) for n in DATASETS)

def test_unknown_class_lists_choices():
    with pytest.raises(ValueError) as e: get_dataset('shapes', n=10, classes=['pegasus'])
    assert 'pegasus' in str(e.value) and 'circle' in str(e.value)

def test_class_subset_remaps_labels():
    ds = get_dataset('shapes', n=200, classes=['cross', 'circle'])
    full = get_dataset('shapes', n=200)
    assert ds.classes == ['cross', 'circle'] and set(ds.labels.tolist()) == {0, 1}
    assert torch.equal(ds.images[ds.labels == 0], full.images[full.labels == SHAPES.index('cross')])

def test_cifar_missing_offline_names_folder(tmp_path):
    with pytest.raises(FileNotFoundError) as e: get_dataset('cifar10', root=tmp_path, download=False)
    assert str(tmp_path) in str(e.value) and 'Download' in str(e.value)

def test_kaokore_missing_names_folder(tmp_path):
    with pytest.raises(FileNotFoundError) as e: get_dataset('kaokore', root=tmp_path / 'kk', download=False)
    assert 'labels.csv' in str(e.value) and 'images_256' in str(e.value)

def test_kaokore_fake_copy(tmp_path):
    (tmp_path / 'images_256').mkdir()
    rows = ['image,gender,status,set']
    for i in range(8):
        Image.fromarray(np.full((256, 256, 3), i * 30, np.uint8)).save(tmp_path / 'images_256' / f'{i:08d}.jpg')
        rows.append(f'{i:08d}.jpg,{i % 2},{i % 4},{["train", "dev", "test"][i % 3]}')
    (tmp_path / 'labels.csv').write_text('\n'.join(rows) + '\n')
    ds = get_dataset('kaokore', root=tmp_path, download=False, label='gender', size=32)
    assert len(ds) == 3 and ds.classes == ['male', 'female'] and ds[0][0].shape == (3, 32, 32)
    assert [int(ds[i][1]) for i in range(3)] == [0, 1, 0]   # images 0, 3, 6
    assert len(KaoKore(tmp_path, split='dev', label='status')) == 3
    with pytest.raises(ValueError): KaoKore(tmp_path, split='valid')
    with pytest.raises(ValueError): KaoKore(tmp_path, label='age')

def _npz(path, **arrays):
    np.savez(path, **arrays); return path

def test_npz_round_trip_and_classes(tmp_path):
    imgs, labels = make_shapes(30, seed=1)
    p = _npz(tmp_path / 'd.npz', images=imgs.permute(0, 2, 3, 1).numpy(), labels=labels.numpy(), classes=np.array(SHAPES))
    ds = get_dataset('npz', root=p)
    assert torch.equal(ds.images, imgs) and ds.classes == SHAPES
    sub = get_dataset('npz', root=p, classes=['ring'], size=16)
    assert sub.images.shape[1:] == (3, 16, 16) and (sub.labels == 0).all() and len(sub) == int((labels == 3).sum())

@pytest.mark.parametrize('arrays,msg', [
    (dict(images=np.zeros((4, 32, 32, 3), np.float32), labels=np.zeros(4, np.int64)), 'uint8'),
    (dict(images=np.zeros((4, 3, 32, 32), np.uint8), labels=np.zeros(4, np.int64)), '(N, H, W, 3)'),
    (dict(images=np.zeros((4, 32, 32, 3), np.uint8), labels=np.zeros(5, np.int64)), 'labels'),
    (dict(pictures=np.zeros((4, 32, 32, 3), np.uint8), labels=np.zeros(4, np.int64)), "'images'"),
])
def test_npz_bad_arrays(tmp_path, arrays, msg):
    p = _npz(tmp_path / 'bad.npz', **arrays)
    with pytest.raises(ValueError) as e: load_npz(p)
    assert msg in str(e.value)

def test_npz_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError) as e: get_dataset('npz', root=tmp_path / 'nope.npz')
    assert 'nope.npz' in str(e.value)

def test_npz_and_folder_need_root_and_have_no_test_split(tmp_path):
    with pytest.raises(ValueError): get_dataset('npz')
    with pytest.raises(ValueError): get_dataset('folder', root=tmp_path, train=False)

def test_array_dataset_validates():
    with pytest.raises(ValueError): ArrayDataset(torch.zeros(2, 32, 32, 3, dtype=torch.uint8), torch.zeros(2))
    with pytest.raises(ValueError): ArrayDataset(torch.zeros(2, 3, 8, 8), torch.zeros(2))
    with pytest.raises(ValueError): ArrayDataset(torch.zeros(2, 3, 8, 8, dtype=torch.uint8), torch.zeros(3))

def test_device_loader_epochs_cover_data_and_replay():
    ds = get_dataset('shapes', n=130)
    dl = DeviceLoader(ds, batch_size=32, flip=True, seed=7)
    assert len(dl) == 5
    ys = torch.cat([y for _, y in dl])
    assert torch.equal(ys.sort().values, ds.labels.sort().values)
    a = [x for x, _ in DeviceLoader(ds, 32, flip=True, seed=7).iter_epoch(3)]
    b = [x for x, _ in DeviceLoader(ds, 32, flip=True, seed=7).iter_epoch(3)]
    assert all(torch.equal(p, q) for p, q in zip(a, b))
    with pytest.raises(TypeError): DeviceLoader([1, 2, 3])

def test_get_loader_plain_path(tmp_path):
    from torch.utils.data import DataLoader, TensorDataset
    tds = TensorDataset(torch.rand(10, 3, 8, 8), torch.arange(10))
    dl = get_loader(tds, batch_size=4, flip=True)
    assert isinstance(dl, DataLoader)
    x, y = next(iter(dl))
    assert x.shape == (4, 3, 8, 8) and y.dtype == torch.int64

def test_split_dataset_is_disjoint_and_deterministic():
    ds = get_dataset('shapes', n=100)
    tr, va = split_dataset(ds, 0.2, seed=3)
    tr2, va2 = split_dataset(ds, 0.2, seed=3)
    assert len(tr) == 80 and len(va) == 20 and torch.equal(va.images, va2.images)
    assert not (tr.images.flatten(1)[:, None] == va.images.flatten(1)[None]).all(-1).any()

def test_kaokore_download_follows_official_method(tmp_path):
    "download_kaokore reads labels.csv + urls.txt from the repository and saves line i as images_256/{i:08d}.jpg (file:// here)."
    from vqlearn.data import download_kaokore
    repo, src = tmp_path / 'repo', tmp_path / 'src'
    repo.mkdir(); src.mkdir()
    urls = []
    for i in range(3):
        Image.fromarray(np.full((256, 256), 40 * i, np.uint8), mode='L').save(src / f'{i}.png')  # greyscale -> RGB on save
        urls.append((src / f'{i}.png').as_uri())
    (repo / 'urls.txt').write_text('\n'.join(urls[:1] + [''] + urls[1:]) + '\n')   # an empty line keeps its index
    (repo / 'labels.csv').write_text('image,gender,status,set\n00000000.jpg,0,1,train\n00000002.jpg,1,3,train\n00000003.jpg,0,0,test\n')
    root = download_kaokore(tmp_path / 'kk', threads=2, base_url=repo.as_uri())
    assert sorted(p.name for p in (root / 'images_256').iterdir()) == ['00000000.jpg', '00000002.jpg', '00000003.jpg']
    with Image.open(root / 'images_256' / '00000002.jpg') as im: assert im.mode == 'RGB' and im.size == (256, 256)
    ds = get_dataset('kaokore', root=root, download=False, size=16)
    assert len(ds) == 2 and [int(ds[i][1]) for i in range(2)] == [1, 3]
