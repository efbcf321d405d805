"""download-teachers against archives this test builds and serves over real HTTP on 127.0.0.1."""

from __future__ import annotations

import http.server
import io
import tarfile
import threading
from pathlib import Path

import pytest
import torch
import yaml

from dkd_tune.commands.download_teachers import COMPLETE_MARKER, download_teachers
from dkd_tune.config.loading import load_search_space
from dkd_tune.core.errors import UserInputError
from dkd_tune.models import create_model
from tests.test_search_e2e import cli

pytestmark = pytest.mark.usefixtures("single_torch_thread")


def mdistiller_checkpoint(model: str) -> bytes:
    """A checkpoint as mdistiller's release stores them: {"model": state dict, "best_acc", "epoch"}."""
    torch.manual_seed(0)
    buffer = io.BytesIO()
    torch.save({"model": create_model(model, 100).state_dict(), "best_acc": 70.0, "epoch": 240}, buffer)
    return buffer.getvalue()


def tar_bytes(files: dict[str, bytes]) -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w") as tar:
        for name, content in files.items():
            info = tarfile.TarInfo(name)
            info.size = len(content)
            tar.addfile(info, io.BytesIO(content))
    return buffer.getvalue()


@pytest.fixture(scope="module")
def release() -> bytes:
    return tar_bytes(
        {
            f"cifar_teachers/{model}_vanilla/ckpt_epoch_240.pth": mdistiller_checkpoint(model)
            for model in ("resnet56", "wrn_40_2")
        }
    )


class Handler(http.server.BaseHTTPRequestHandler):
    """Serves `self.server.files[path]`; `truncate` sends half the body under the full Content-Length."""

    def do_GET(self):
        content = self.server.files.get(self.path)
        if content is None:
            self.send_error(404, "Not Found")
            return
        self.send_response(200)
        self.send_header("Content-Length", str(len(content)))
        self.end_headers()
        self.wfile.write(content[: len(content) // 2] if self.server.truncate else content)

    def log_message(self, *args):
        pass


@pytest.fixture
def server():
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    httpd.files, httpd.truncate = {}, False
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield httpd
    httpd.shutdown()
    httpd.server_close()


def url(server, path: str = "/cifar_teachers.tar") -> str:
    return f"http://127.0.0.1:{server.server_address[1]}{path}"


def test_downloads_checks_and_unpacks_where_the_search_files_look(server, release, tmp_path):
    server.files["/cifar_teachers.tar"] = release
    result = cli("download-teachers", "--to", str(tmp_path / "ckpt"), "--url", url(server), cwd=tmp_path)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    folder = tmp_path / "ckpt" / "cifar_teachers"
    assert sorted(p.name for p in folder.iterdir()) == [
        COMPLETE_MARKER,
        "resnet56_vanilla",
        "wrn_40_2_vanilla",
    ]
    assert "2 teachers" in result.stdout
    # A search file pointing there loads (its checkpoint check reads the weights).
    space = {
        "name": "uses-release",
        "data": {
            "name": "synthetic",
            "root": str(tmp_path / "data"),
            "generate": {"classes": 100, "image_size": 8},
        },
        "student": "resnet8",
        "teachers": [
            {"model": "resnet56", "checkpoint": str(folder / "resnet56_vanilla" / "ckpt_epoch_240.pth")}
        ],
        "storage": str(tmp_path / "runs"),
    }
    (tmp_path / "space.yaml").write_text(yaml.safe_dump(space))
    assert load_search_space(tmp_path / "space.yaml").teachers[0].model == "resnet56"
    again = cli("download-teachers", "--to", str(tmp_path / "ckpt"), "--url", url(server), cwd=tmp_path)
    assert again.returncode == 0 and "nothing to do" in again.stdout


@pytest.mark.parametrize(
    ("serve", "message"),
    [
        ("truncated", "download ended after"),
        ("missing", "the server answered 404"),
        ("not a tar", "not a readable tar archive"),
        ("wrong architecture", "is not a usable resnet56 teacher"),
        ("escaping path", "unexpected entry 'cifar_teachers/../evil'"),
        ("no teachers", "no cifar_teachers/<model>_vanilla/ckpt_epoch_240.pth"),
    ],
)
def test_a_failed_download_is_one_line_and_leaves_nothing(server, release, tmp_path, serve, message):
    content = {
        "truncated": release,
        "not a tar": b"<html>moved</html>" * 100,
        "wrong architecture": tar_bytes(
            {"cifar_teachers/resnet56_vanilla/ckpt_epoch_240.pth": mdistiller_checkpoint("resnet20")}
        ),
        "escaping path": tar_bytes({"cifar_teachers/../evil": b"x"}),
        "no teachers": tar_bytes({"cifar_teachers/README": b"x"}),
    }.get(serve)
    if content is not None:
        server.files["/cifar_teachers.tar"] = content
    server.truncate = serve == "truncated"
    destination = tmp_path / "ckpt"
    with pytest.raises(UserInputError, match=message) as error:
        download_teachers(destination, url=url(server), log=lambda line: None)
    assert "\n" not in str(error.value)
    assert list(destination.iterdir()) == []  # no archive, no partial folder, no scratch space
    assert not (tmp_path / "evil").exists()


def test_the_cli_exits_2_with_one_line(server, tmp_path):
    result = cli(
        "download-teachers", "--to", str(tmp_path / "ckpt"), "--url", url(server, "/nope.tar"), cwd=tmp_path
    )
    assert result.returncode == 2
    assert (
        result.stderr.strip().count("\n") == 0 and "404" in result.stderr and "Traceback" not in result.stderr
    )


def test_the_missing_teacher_message_names_the_command(tmp_path):
    space = yaml.safe_load(
        (Path(__file__).resolve().parents[1] / "search_spaces" / "cifar_shufflenet.yaml").read_text()
    )
    for teacher in space["teachers"]:
        teacher["checkpoint"] = teacher["checkpoint"].replace("~/checkpoints", str(tmp_path / "ckpt"))
    space["data"] = {"name": "cifar100", "root": str(tmp_path / "data"), "download": True}
    (tmp_path / "space.yaml").write_text(yaml.safe_dump(space))
    with pytest.raises(UserInputError, match=f"dkd-tune download-teachers --to {tmp_path / 'ckpt'}"):
        load_search_space(tmp_path / "space.yaml")
