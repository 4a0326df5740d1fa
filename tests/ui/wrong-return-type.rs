use dispatcher::task;

#[task]
async fn plain(input: String) -> String {
    input
}

fn main() {}
