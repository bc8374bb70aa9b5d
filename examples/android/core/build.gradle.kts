// Plain Kotlin/JVM: no Android, no dependencies beyond the standard library, so Debian's kotlinc 1.3 builds it too
// (tests/test_android_core.py does exactly that in `make test`).
plugins {
    id("org.jetbrains.kotlin.jvm")
}

kotlin {
    jvmToolchain(17)
}

// `./gradlew :core:goldenTest -Pgoldens=DIR` runs the golden-file test (write DIR with
// `python -m afedge.chat.golden BUNDLE DIR`).
tasks.register<JavaExec>("goldenTest") {
    group = "verification"
    classpath = sourceSets["test"].runtimeClasspath
    mainClass.set("org.afedge.chat.GoldenTestKt")
    args(project.findProperty("goldens")?.toString() ?: "goldens", layout.buildDirectory.dir("golden-out").get().asFile.path)
}
