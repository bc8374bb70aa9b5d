// The afedge chat demo: `core` is plain Kotlin/JVM (tokenizer, manifest, generation loop, state files; tested on a
// desktop JVM against golden files from the Python side), `app` is the Android UI over ExecuTorch.
plugins {
    id("com.android.application") version "8.5.2" apply false
    id("org.jetbrains.kotlin.android") version "1.9.24" apply false
    id("org.jetbrains.kotlin.jvm") version "1.9.24" apply false
}
